-- teacher: weigh (or drop) the tokens one of several routed teachers scored.
--
--   w_t = $weight   if teacher_id = $name (the token was scored by teacher $name)
--   w_t = 1         otherwise (other teachers; a single-teacher run has teacher_id null)
--
-- weight 0 drops that teacher's tokens, 0.5 halves their say. Compose it with another policy
-- (product of weights), e.g. rules [all, teacher {name: b, weight: 0.5}].
-- Parameters: $name (a key of `teachers`), $weight >= 0.
SELECT rid, CASE WHEN teacher_id = $name THEN $weight ELSE 1.0 END AS weight
FROM tok
