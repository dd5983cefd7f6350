-- Batch recommendations for every uro user: a user the model does not know (no interactions
-- in the exported data, or joined after the export) gets the model's popular items per kind,
-- flagged cold_start. Rows written before this migration are model recommendations: false.
ALTER TABLE recs_user_recommendations
    ADD COLUMN IF NOT EXISTS cold_start BOOL NOT NULL DEFAULT false;

-- The new column goes last: CREATE OR REPLACE VIEW may only add columns at the end, on
-- PostgreSQL and CockroachDB alike.
CREATE OR REPLACE VIEW recs_live_user_recommendations AS
    SELECT r.user_id, r.item_kind, r.rank, r.item_id, r.score, r.model_version,
           r.generated_at, r.generation, r.cold_start
    FROM recs_user_recommendations AS r
    JOIN recs_recommendation_pointer AS p ON r.generation = p.generation;
