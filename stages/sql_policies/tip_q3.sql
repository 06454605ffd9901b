-- tip_q3 (TIP quadrant 3, "overconfident and wrong"): low behaviour entropy AND high divergence.
--
--   keep  H_b < quantile($entropy_quantile of H_b)  AND  D >= quantile($divergence_quantile of D)
--
-- Quantiles (quantile_cont) are taken over all student tokens of the dataset.
-- D, a divergence available offline ($divergence):
--   'rkl' (default): D = behavior_logprob - teacher_logprob, the single-sample reverse-KL estimate
--          log pi_b(y)/pi_T(y). Signed on purpose: it is large when the student was confident in a
--          token the teacher finds unlikely ("wrong"); a token the teacher likes MORE than the
--          student (negative D) is not an error, so |gap| would mix the two.
--   'abs': D = |teacher_logprob - behavior_logprob| (any disagreement).
-- The paper's threshold values were not found; defaults are median entropy, top 10 % divergence.
-- Parameters: $entropy_quantile in (0, 1), $divergence_quantile in [0, 1), $divergence.
-- Needs: behavior_entropy.
WITH d AS (
    SELECT
        rid,
        segment,
        behavior_entropy::DOUBLE AS h,
        CASE WHEN $divergence = 'abs' THEN abs(teacher_logprob - behavior_logprob)
             ELSE behavior_logprob - teacher_logprob END::DOUBLE AS div
    FROM tok
),
q AS (
    SELECT
        quantile_cont(h, $entropy_quantile) AS h_q,
        quantile_cont(div, $divergence_quantile) AS d_q
    FROM d
    WHERE segment = 0
)
SELECT rid, CASE WHEN segment = 0 AND h < h_q AND div >= d_q THEN 1.0 ELSE 0.0 END AS weight
FROM d, q
