-- tip_type_aware (TIP): the entropy-selected tokens UNION the Q3 tokens
-- (weight = max of the two 0/1 masks). See entropy.sql and tip_q3.sql for the two rules; this file
-- is their bodies side by side, with the same parameters:
-- $rho, $mode, $alpha (entropy) and $entropy_quantile, $divergence_quantile, $divergence (Q3).
-- Needs: behavior_entropy.
WITH keyed AS (
    SELECT
        rid,
        segment,
        sample_id,
        pos,
        behavior_entropy::DOUBLE AS h,
        CASE WHEN $divergence = 'abs' THEN abs(teacher_logprob - behavior_logprob)
             ELSE behavior_logprob - teacher_logprob END::DOUBLE AS div,
        CASE
            WHEN segment <> 0 THEN NULL
            WHEN $mode = 'top' THEN -behavior_entropy::DOUBLE
            ELSE -ln(((md5_number(concat($seed, ':', sample_id, ':', pos)) >> 75)::DOUBLE + 0.5)
                     / 9007199254740992.0)
                 / pow(greatest(behavior_entropy::DOUBLE / $ln_v, 1e-8), $alpha)
        END AS key
    FROM tok
),
q AS (
    SELECT
        quantile_cont(h, $entropy_quantile) AS h_q,
        quantile_cont(div, $divergence_quantile) AS d_q
    FROM keyed
    WHERE segment = 0
),
ranked AS (
    SELECT
        rid,
        segment,
        h,
        div,
        row_number() OVER (ORDER BY segment <> 0, key, sample_id, pos) AS rn
    FROM keyed
),
-- (a plain count, not count(*) OVER (): DuckDB evaluates that window far more slowly)
n AS (SELECT count(*) AS n_student FROM tok WHERE segment = 0)
SELECT
    rid,
    CASE WHEN segment = 0 AND (rn <= round($rho * n_student) OR (h < h_q AND div >= d_q))
         THEN 1.0 ELSE 0.0 END AS weight
FROM ranked, q, n
