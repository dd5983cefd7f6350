-- Model workers with [worker] recent_events read the events inserted since their model's
-- export, in keyset pages on (inserted_at, primary key).
CREATE INDEX IF NOT EXISTS recs_events_inserted_at_idx ON recs_events (inserted_at);
