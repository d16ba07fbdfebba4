//! PostgreSQL's side of the sealing's SQL (`../keys.rs`): the `keys`
//! table, made by the schema migration, and [`KeyTx`] on a transaction.
//! Token rows are locked with `FOR UPDATE`, as every other write does
//! (`ops.rs`), so a re-seal and a refresh commit of one row serialise.

use postgres::Transaction;

use super::super::Result;
use super::super::keys::{KeyTx, StoredTokens};
use crate::seal::WrappedKey;
use crate::secret::Secret;

/// Schema version 4: the wrapped data keys, as in SQLite. Idempotent; run
/// by the migration under its advisory lock.
pub fn create_table(c: &mut Transaction<'_>) -> Result<()> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS keys (
             id BIGINT PRIMARY KEY,
             wrapped TEXT NOT NULL,
             kek_fingerprint TEXT NOT NULL,
             created_at BIGINT NOT NULL
         );",
    )?;
    Ok(())
}

fn tokens_row(r: &postgres::Row) -> StoredTokens {
    StoredTokens {
        name: r.get(0),
        has_refresh_token: r.get::<_, &str>(1) != "client_credentials",
        access_token: r.get::<_, Option<String>>(2).map(Secret::new),
        refresh_token: Secret::new(r.get::<_, String>(3)),
    }
}

fn id(r: &postgres::Row, i: usize) -> u32 {
    u32::try_from(r.get::<_, i64>(i)).unwrap_or(u32::MAX)
}

/// The active data key's id (None: the store is plaintext), as a column
/// [`active_key`] reads: a query of its own, or one column of the refresh
/// commit's statement (`ops.rs`), which saves a statement per commit.
pub(super) const ACTIVE: &str = "SELECT max(id) FROM keys";

/// The active key's id in column `at` of a row that selected [`ACTIVE`].
pub(super) fn active_key(r: &postgres::Row, at: usize) -> Option<u32> {
    r.get::<_, Option<i64>>(at)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

impl KeyTx for super::Tx<'_> {
    fn keys(&mut self) -> Result<Vec<WrappedKey>> {
        let rows = self.query("SELECT id, wrapped, created_at FROM keys ORDER BY id", &[])?;
        Ok(rows
            .iter()
            .map(|r| WrappedKey {
                id: id(r, 0),
                wrapped: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    fn active(&mut self) -> Result<Option<u32>> {
        let r = self.query_one(ACTIVE, &[])?;
        Ok(active_key(&r, 0))
    }

    /// The table locked in SHARE mode first. The mode is shared, so such
    /// writes do not wait for each other; but a change of the keys (a key
    /// added, rewrapped or deleted) waits until every such write has
    /// committed, and a write waits for a change under way. A rotation
    /// thus adds its key only once the rows sealed with the old one are
    /// there for its re-sealing to find, and a write after it reads the
    /// new key and seals again.
    fn active_held(&mut self) -> Result<Option<u32>> {
        self.execute("LOCK TABLE keys IN SHARE MODE", &[])?;
        self.active()
    }

    fn insert_key(&mut self, k: &WrappedKey, kek_fingerprint: &str) -> Result<bool> {
        let n = self.execute(
            "INSERT INTO keys (id, wrapped, kek_fingerprint, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
            &[
                &i64::from(k.id),
                &k.wrapped,
                &kek_fingerprint,
                &k.created_at,
            ],
        )?;
        Ok(n > 0)
    }

    fn rewrap_key(
        &mut self,
        old: &WrappedKey,
        new: &WrappedKey,
        kek_fingerprint: &str,
    ) -> Result<bool> {
        let n = self.execute(
            "UPDATE keys SET wrapped = $3, kek_fingerprint = $4 WHERE id = $1 AND wrapped = $2",
            &[
                &i64::from(old.id),
                &old.wrapped,
                &new.wrapped,
                &kek_fingerprint,
            ],
        )?;
        Ok(n > 0)
    }

    fn delete_key(&mut self, id: u32) -> Result<()> {
        self.execute("DELETE FROM keys WHERE id = $1", &[&i64::from(id)])?;
        Ok(())
    }

    fn stored_tokens(&mut self) -> Result<Vec<StoredTokens>> {
        let rows = self.query(
            "SELECT name, grant_type, access_token, refresh_token FROM credentials ORDER BY name",
            &[],
        )?;
        Ok(rows.iter().map(tokens_row).collect())
    }

    fn lock_tokens(&mut self, name: &str) -> Result<Option<StoredTokens>> {
        let row = self.query_opt(
            "SELECT name, grant_type, access_token, refresh_token FROM credentials
             WHERE name = $1 FOR UPDATE",
            &[&name],
        )?;
        Ok(row.as_ref().map(tokens_row))
    }

    fn replace_tokens(
        &mut self,
        old: &StoredTokens,
        access: Option<&str>,
        refresh: &str,
    ) -> Result<bool> {
        let n = self.execute(
            "UPDATE credentials SET access_token = $4, refresh_token = $5
             WHERE name = $1 AND access_token IS NOT DISTINCT FROM $2 AND refresh_token = $3",
            &[
                &old.name,
                &old.access_token.as_ref().map(Secret::expose),
                &old.refresh_token.expose(),
                &access,
                &refresh,
            ],
        )?;
        Ok(n > 0)
    }
}
