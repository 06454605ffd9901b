-- entropy (TIP, "Token Importance in OPD"): keep a fraction $rho of the student tokens, favouring
-- high behaviour entropy H_b (the tokens where the student is unsure carry most of the signal).
--
--   mode = 'top'    : the round($rho * N) tokens with the highest H_b (ties: sample_id, pos).
--   mode = 'sample' : weighted sampling without replacement (Efraimidis-Spirakis exponential keys):
--                     key = -ln(u) / max(Hbar, 1e-8)^$alpha,  Hbar = H_b / ln V,
--                     keep the round($rho * N) smallest keys. $alpha = 0 is uniform sampling.
--                     u in (0, 1) comes from md5("<seed>:<sample_id>:<pos>") (top 53 bits of
--                     md5_number, i.e. the digest read little-endian), so it is reproducible,
--                     platform-independent and does not depend on row order or threads.
--
-- "Keep $rho" is GLOBAL: over all student tokens (segment 0) of the dataset, not per sequence, so a
-- long confident answer may keep few tokens and a hard one many (as in TIP). N = number of student
-- tokens. Parameters: $rho in (0, 1], $mode in ('top', 'sample'), $alpha >= 0.
-- Needs: behavior_entropy (score with score.behavior=true and score.entropy=true).
--
-- How: the m = round($rho * N) smallest keys are those below the m-th smallest key (`cut`), plus
-- the first ones, by (sample_id, pos), of the tokens whose key equals it (`ties`). This equals
-- row_number() OVER (ORDER BY key, sample_id, pos) <= m, but sorts only the numeric keys and the
-- ties by their string ids: ~3x faster than that window on millions of tokens.
WITH keyed AS (
    SELECT
        rid,
        sample_id,
        pos,
        CASE
            WHEN segment <> 0 THEN NULL
            WHEN $mode = 'top' THEN -behavior_entropy::DOUBLE
            ELSE -ln(((md5_number(concat($seed, ':', sample_id, ':', pos)) >> 75)::DOUBLE + 0.5)
                     / 9007199254740992.0)
                 / pow(greatest(behavior_entropy::DOUBLE / $ln_v, 1e-8), $alpha)
        END AS key
    FROM tok
),
n AS (SELECT round($rho * count(*))::BIGINT AS m FROM tok WHERE segment = 0),
cut AS (  -- the m-th smallest key (NULL when m = 0: nothing kept)
    SELECT max(key) AS k
    FROM (SELECT key FROM keyed WHERE key IS NOT NULL ORDER BY key LIMIT (SELECT m FROM n))
),
below AS (SELECT count(*) AS n_below FROM keyed, cut WHERE key < k),
ties AS (
    SELECT rid, row_number() OVER (ORDER BY sample_id, pos) AS rn FROM keyed, cut WHERE key = k
)
SELECT rid, CASE WHEN key < k OR rn <= m - n_below THEN 1.0 ELSE 0.0 END AS weight
FROM keyed CROSS JOIN cut CROSS JOIN below CROSS JOIN n LEFT JOIN ties USING (rid)
