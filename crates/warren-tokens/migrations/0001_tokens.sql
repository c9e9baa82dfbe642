-- Subjects, tokens, usage per token and period, leases held by sender
-- replicas, uses per day and refusals. Applied once by warren-tokens'
-- migration runner (see src/migrate.rs).

CREATE TABLE applications (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_groups (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    group_id uuid REFERENCES user_groups (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id uuid PRIMARY KEY,
    -- SHA-256 of the whole secret string; the secret itself is never stored.
    secret_hash bytea NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    -- The secret's last characters, to recognise it in lists.
    hint text NOT NULL,
    subject_kind text NOT NULL CHECK (subject_kind IN ('application', 'group', 'user')),
    application_id uuid REFERENCES applications (id),
    group_id uuid REFERENCES user_groups (id),
    user_id uuid REFERENCES users (id),
    limit_kind text NOT NULL CHECK (limit_kind IN ('unlimited', 'max_uses', 'monthly')),
    limit_value bigint CHECK (limit_value IS NULL OR limit_value >= 0),
    queues text[],
    expires_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(application_id, group_id, user_id) = 1),
    CHECK ((subject_kind = 'application') = (application_id IS NOT NULL)),
    CHECK ((subject_kind = 'group') = (group_id IS NOT NULL)),
    CHECK ((subject_kind = 'user') = (user_id IS NOT NULL)),
    CHECK ((limit_kind = 'unlimited') = (limit_value IS NULL))
);

-- One row per token and period: the first day of the UTC month for monthly
-- limits, 1970-01-01 ("lifetime") for the others. used + leased <= limit
-- holds at every commit: uses are only granted to replicas as leases.
CREATE TABLE token_usage (
    token_id uuid NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    period date NOT NULL,
    used bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    leased bigint NOT NULL DEFAULT 0 CHECK (leased >= 0),
    PRIMARY KEY (token_id, period)
);

-- Uses a sender replica (holder) took and has not yet spent or returned.
CREATE TABLE token_leases (
    token_id uuid NOT NULL,
    period date NOT NULL,
    holder uuid NOT NULL,
    held bigint NOT NULL CHECK (held >= 0),
    renewed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, period, holder),
    FOREIGN KEY (token_id, period) REFERENCES token_usage (token_id, period) ON DELETE CASCADE
);
CREATE INDEX token_leases_holder ON token_leases (holder);

CREATE TABLE token_daily_uses (
    token_id uuid NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    day date NOT NULL,
    uses bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, day)
);

-- Refusals: one row per refusal up to a per-token rate; past it, one row per
-- (token, reason, queue, minute) whose count grows (aggregated = true).
CREATE TABLE token_refusals (
    id bigserial PRIMARY KEY,
    token_id uuid REFERENCES tokens (id) ON DELETE CASCADE,
    reason text NOT NULL,
    queue text,
    at timestamptz NOT NULL,
    count bigint NOT NULL DEFAULT 1 CHECK (count >= 1),
    aggregated boolean NOT NULL DEFAULT false
);
CREATE INDEX token_refusals_token_at ON token_refusals (token_id, at DESC);
CREATE INDEX token_refusals_reason_at ON token_refusals (reason, at DESC);

-- Every change to a token (revocation, expiry, deletion) is announced to the
-- sender replicas, which drop it from their caches at once.
CREATE FUNCTION warren_token_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('warren_tokens', OLD.id::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('warren_tokens', NEW.id::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER tokens_changed AFTER UPDATE OR DELETE ON tokens
FOR EACH ROW EXECUTE FUNCTION warren_token_changed();
