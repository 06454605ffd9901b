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
-- the entropy rule as in entropy.sql: keys below the m-th smallest, then ties by (sample_id, pos)
n AS (SELECT round($rho * count(*))::BIGINT AS m FROM tok WHERE segment = 0),
cut AS (
    SELECT max(key) AS k
    FROM (SELECT key FROM keyed WHERE key IS NOT NULL ORDER BY key LIMIT (SELECT m FROM n))
),
below AS (SELECT count(*) AS n_below FROM keyed, cut WHERE key < k),
ties AS (
    SELECT rid, row_number() OVER (ORDER BY sample_id, pos) AS rn FROM keyed, cut WHERE key = k
)
SELECT
    rid,
    CASE WHEN segment = 0 AND (key < k OR rn <= m - n_below OR (h < h_q AND div >= d_q))
         THEN 1.0 ELSE 0.0 END AS weight
FROM keyed CROSS JOIN q CROSS JOIN cut CROSS JOIN below CROSS JOIN n LEFT JOIN ties USING (rid)
