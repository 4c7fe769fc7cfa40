-- xoauth2-proxy's own role and schema in NocoBase's PostgreSQL database, for
-- `[store] kind = "postgres"` (docs/shared-store.md). Run it once, as the
-- database's owner, in NocoBase's database; put a password of your own in
-- place of CHANGE-ME, and the same in the proxy's [store] url:
--   postgres://xoauth2_proxy:CHANGE-ME@postgres:5432/nocobase
--
-- Compose: docker compose exec -T postgres psql -U nocobase -d nocobase < shared-store.sql
-- Kubernetes: kubectl exec -i POSTGRES-POD -- psql -U nocobase -d nocobase < shared-store.sql
--
-- The role owns its schema and nothing else: it cannot read or change
-- NocoBase's tables. The proxy creates its tables in the schema on first start
-- (versioned migrations, recorded in xoauth2_proxy.schema_migrations).
CREATE ROLE xoauth2_proxy LOGIN PASSWORD 'CHANGE-ME';
CREATE SCHEMA xoauth2_proxy AUTHORIZATION xoauth2_proxy;
