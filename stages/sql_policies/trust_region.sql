-- trust_region (TrOPD trust mask, offline proxy, inferred form): keep the tokens where the teacher
-- is trusted, min(pi_T(y)/pi_b(y), 1) >= $tau, i.e.
--
--   teacher_logprob - behavior_logprob >= ln($tau)
--
-- The behaviour policy stands in for the current student (exact for one pass over fresh rollouts,
-- a proxy afterwards). Parameters: $tau in (0, 1].
SELECT
    rid,
    CASE WHEN segment = 0 AND teacher_logprob - behavior_logprob >= ln($tau) THEN 1.0 ELSE 0.0 END
        AS weight
FROM tok
