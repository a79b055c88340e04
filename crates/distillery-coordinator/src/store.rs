//! The coordinator's durable state: jobs, shards (with their attempts) and committed shard keys,
//! in one redb file `coordinator.redb` inside the state directory.
//!
//! Records are JSON so the format can grow additively. Every mutation is its own ACID transaction;
//! a shard's `committed` state and its key in `committed` are written in the same transaction, so a
//! crash cannot leave one without the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{CoordError, Result};
use crate::model::{JobRecord, Shard};

/// job id → JobRecord (JSON).
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// (job id, shard id) → Shard (JSON).
const SHARDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("shards");
/// shard key → cache version of its commit.
const COMMITTED: TableDefinition<&str, u64> = TableDefinition::new("committed");

/// Everything loaded from a state directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub jobs: Vec<(JobRecord, Vec<Shard>)>,
    pub committed: HashMap<String, u64>,
}

/// A handle on the state file.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

fn json_err(what: &str, e: serde_json::Error) -> CoordError {
    CoordError::Store(format!("{what}: {e}"))
}

impl Store {
    /// Opens (creating when needed) `state_dir/coordinator.redb`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| CoordError::Store(format!("create state dir {}: {e}", state_dir.display())))?;
        let path = state_dir.join("coordinator.redb");
        let db = Database::create(&path)
            .map_err(|e| CoordError::Store(format!("open {}: {e}", path.display())))?;
        let w = db.begin_write()?;
        {
            w.open_table(JOBS)?;
            w.open_table(SHARDS)?;
            w.open_table(COMMITTED)?;
        }
        w.commit()?;
        Ok(Self { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every job with its shards (sorted by id) and every committed key.
    pub fn load(&self) -> Result<Loaded> {
        let r = self.db.begin_read()?;
        let jobs_t = r.open_table(JOBS)?;
        let shards_t = r.open_table(SHARDS)?;
        let mut jobs = Vec::new();
        for row in jobs_t.iter()? {
            let (k, v) = row?;
            let rec: JobRecord =
                serde_json::from_slice(v.value()).map_err(|e| json_err(&format!("job {}", k.value()), e))?;
            let mut shards = Vec::new();
            for s in shards_t.range((rec.id.as_str(), 0u64)..=(rec.id.as_str(), u64::MAX))? {
                let (k, v) = s?;
                let (job, id) = k.value();
                let shard: Shard = serde_json::from_slice(v.value())
                    .map_err(|e| json_err(&format!("shard {job}/{id}"), e))?;
                shards.push(shard);
            }
            shards.sort_by_key(|s| s.id);
            jobs.push((rec, shards));
        }
        let mut committed = HashMap::new();
        for row in r.open_table(COMMITTED)?.iter()? {
            let (k, v) = row?;
            committed.insert(k.value().to_string(), v.value());
        }
        Ok(Loaded { jobs, committed })
    }

    /// Writes a job record and, optionally, a set of its shards, in one transaction.
    pub fn put_job(&self, job: &JobRecord, shards: &[Shard]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut jt = w.open_table(JOBS)?;
            let bytes = serde_json::to_vec(job).map_err(|e| json_err("encode job", e))?;
            jt.insert(job.id.as_str(), bytes.as_slice())?;
            let mut st = w.open_table(SHARDS)?;
            let mut ct = w.open_table(COMMITTED)?;
            for s in shards {
                put_shard_in(&mut st, &mut ct, &job.id, s)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Writes shards of one job (and their committed keys) in one transaction.
    pub fn put_shards(&self, job_id: &str, shards: &[&Shard]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut st = w.open_table(SHARDS)?;
            let mut ct = w.open_table(COMMITTED)?;
            for s in shards {
                put_shard_in(&mut st, &mut ct, job_id, s)?;
            }
        }
        w.commit()?;
        Ok(())
    }
}

fn put_shard_in(
    st: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
    ct: &mut redb::Table<'_, &'static str, u64>,
    job_id: &str,
    s: &Shard,
) -> Result<()> {
    let bytes = serde_json::to_vec(s).map_err(|e| json_err("encode shard", e))?;
    st.insert((job_id, s.id), bytes.as_slice())?;
    if s.state == crate::model::ShardState::Committed {
        ct.insert(s.key.as_str(), s.commit_version.unwrap_or(0))?;
    }
    Ok(())
}
