-- uro-recs' own tables in uro's database. Rules: docs/COCKROACHDB.md.
-- Every statement is idempotent and runs on its own (CockroachDB runs DDL outside
-- explicit transactions best), so a migration interrupted half-way is simply run again.

-- Interaction events as they happen. A replayed event hits the primary key and is a no-op.
CREATE TABLE IF NOT EXISTS recs_events (
    user_id UUID NOT NULL,
    item_kind TEXT NOT NULL,
    item_id UUID NOT NULL,
    event TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    weight FLOAT8 NOT NULL DEFAULT 1.0,
    inserted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT recs_events_pkey PRIMARY KEY (user_id, item_kind, item_id, event, occurred_at),
    CONSTRAINT recs_events_item_kind_check CHECK (item_kind IN ('avatar', 'map', 'prop')),
    CONSTRAINT recs_events_event_check CHECK (length(event) BETWEEN 1 AND 64)
);

-- The model registry: one row per trained version, whatever became of it.
CREATE TABLE IF NOT EXISTS recs_model_versions (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics JSONB NOT NULL DEFAULT '{}',
    n_interactions INT8 NOT NULL DEFAULT 0,
    data_start TIMESTAMPTZ,
    data_end TIMESTAMPTZ,
    holder TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    CONSTRAINT recs_model_versions_pkey PRIMARY KEY (model, version),
    CONSTRAINT recs_model_versions_status_check CHECK (
        status IN ('training', 'trained', 'rejected', 'published', 'rolled_back', 'abandoned')
    )
);

-- Batch recommendations, one generation at a time. uro reads the view below, which joins
-- the one-row pointer: a single statement sees exactly one generation.
CREATE TABLE IF NOT EXISTS recs_user_recommendations (
    generation INT8 NOT NULL,
    user_id UUID NOT NULL,
    item_kind TEXT NOT NULL,
    rank INT4 NOT NULL,
    item_id UUID NOT NULL,
    score FLOAT8 NOT NULL,
    model_version TEXT NOT NULL,
    generated_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT recs_user_recommendations_pkey PRIMARY KEY (generation, user_id, item_kind, rank)
);

CREATE TABLE IF NOT EXISTS recs_recommendation_generations (
    generation INT8 NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    status TEXT NOT NULL,
    n_users INT8 NOT NULL DEFAULT 0,
    n_rows INT8 NOT NULL DEFAULT 0,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    CONSTRAINT recs_recommendation_generations_pkey PRIMARY KEY (generation),
    CONSTRAINT recs_recommendation_generations_status_check CHECK (
        status IN ('building', 'live', 'retired', 'failed', 'purged')
    )
);

CREATE TABLE IF NOT EXISTS recs_recommendation_pointer (
    singleton BOOL NOT NULL DEFAULT true,
    generation INT8 NOT NULL,
    flipped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT recs_recommendation_pointer_pkey PRIMARY KEY (singleton),
    CONSTRAINT recs_recommendation_pointer_singleton_check CHECK (singleton)
);

CREATE OR REPLACE VIEW recs_live_user_recommendations AS
    SELECT r.user_id, r.item_kind, r.rank, r.item_id, r.score, r.model_version,
           r.generated_at, r.generation
    FROM recs_user_recommendations AS r
    JOIN recs_recommendation_pointer AS p ON r.generation = p.generation;

-- "Only one sync at a time": a lease row instead of advisory locks.
CREATE TABLE IF NOT EXISTS recs_leases (
    name TEXT NOT NULL,
    holder TEXT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT recs_leases_pkey PRIMARY KEY (name)
);
