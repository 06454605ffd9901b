-- retain: weigh the retention sequences, those whose teacher prefix is the student's own prefix.
--
--   w_t = $weight   if teacher_prompt_ids = train_prompt_ids (no privileged context: the teacher
--                   is the frozen model on the student's own input, so the loss only pulls the
--                   student back to it: a KL anchor against forgetting, e.g. open-book prompts)
--   w_t = 1         otherwise
--
-- Compose it with another policy (product of weights), e.g. select=evidence_retain.
-- Parameters: $weight >= 0.
SELECT
    t.rid,
    CASE WHEN r.teacher_prompt_ids = r.train_prompt_ids THEN $weight ELSE 1.0 END AS weight
FROM tok AS t
JOIN rollouts_in AS r USING (sample_id)
