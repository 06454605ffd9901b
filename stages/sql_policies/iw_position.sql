-- iw_position (IW-OPD position weights): early tokens, before most of the teacher-student
-- disagreement has happened, weigh more.
--
--   a_k     = |teacher_logprob - behavior_logprob|          (student tokens; 0 on segment 1)
--   F_{t-1} = sum_{k<t} a_k / sum_k a_k                     (per sequence; 0 when the sum is 0)
--   w_t     = 1 + ($w_max - 1) * clip(1 - F_{t-1}, 0, 1)   (segment 1: 0)
--
-- Parameters: $w_max >= 1 (IW-OPD default 1.5).
WITH a AS (
    SELECT
        rid,
        sample_id,
        pos,
        segment,
        CASE WHEN segment = 0 THEN abs(teacher_logprob - behavior_logprob) ELSE 0 END::DOUBLE AS a
    FROM tok
),
f AS (
    SELECT
        rid,
        segment,
        coalesce(sum(a) OVER (PARTITION BY sample_id ORDER BY pos
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before,
        sum(a) OVER (PARTITION BY sample_id) AS total
    FROM a
)
SELECT
    rid,
    CASE
        WHEN segment <> 0 THEN 0.0
        ELSE 1.0 + ($w_max - 1.0)
            * greatest(least(1.0 - CASE WHEN total > 0 THEN before / total ELSE 0 END, 1.0), 0.0)
    END AS weight
FROM f
