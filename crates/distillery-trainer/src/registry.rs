//! The trainer service's run registry: a Lance table recording, for every run, its configuration,
//! the cache version and teacher fingerprint it trained from, its state and its final metrics.
//!
//! The table is append-only: a row is written when a run is submitted and again when it ends; the
//! newest row of a run id is its current record. Append-only writes need no read-modify-write and
//! keep each run's history.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, Int64Array, RecordBatch, RecordBatchIterator, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::{WriteMode, WriteParams};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One registry row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    pub state: String,
    pub config_toml: String,
    pub run_dir: String,
    pub faces: Option<String>,
    pub cache: Option<String>,
    pub cache_version: Option<u64>,
    pub teacher: Option<String>,
    pub step: u64,
    pub total_steps: u64,
    /// Final (or latest) metrics as a JSON object of name → number.
    pub metrics_json: String,
    pub error: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn schema() -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        s("run_id", false),
        s("state", false),
        s("config_toml", false),
        s("run_dir", false),
        s("faces", true),
        s("cache", true),
        Field::new("cache_version", DataType::UInt64, true),
        s("teacher", true),
        Field::new("step", DataType::UInt64, false),
        Field::new("total_steps", DataType::UInt64, false),
        s("metrics_json", false),
        s("error", false),
        Field::new("created_at_ms", DataType::Int64, false),
        Field::new("updated_at_ms", DataType::Int64, false),
    ]))
}

/// The registry table at `<state_dir>/runs.lance`.
pub struct Registry {
    uri: String,
}

fn lance_err(op: &str, uri: &str, e: lance::Error) -> Error {
    Error::Data(format!("run registry {op} `{uri}`: {e}"))
}

impl Registry {
    pub fn new(state_dir: &Path) -> Self {
        Self { uri: state_dir.join("runs.lance").display().to_string() }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    async fn open(&self) -> Result<Option<Dataset>> {
        match Dataset::open(&self.uri).await {
            Ok(d) => Ok(Some(d)),
            Err(lance::Error::DatasetNotFound { .. } | lance::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(lance_err("open", &self.uri, e)),
        }
    }

    /// Appends `records` (creating the table on first use).
    pub async fn append(&self, records: &[RunRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let strs = |f: &dyn Fn(&RunRecord) -> String| -> Arc<dyn Array> {
            Arc::new(StringArray::from(records.iter().map(f).collect::<Vec<_>>()))
        };
        let opt = |f: &dyn Fn(&RunRecord) -> Option<String>| -> Arc<dyn Array> {
            Arc::new(StringArray::from(records.iter().map(f).collect::<Vec<_>>()))
        };
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                strs(&|r| r.run_id.clone()),
                strs(&|r| r.state.clone()),
                strs(&|r| r.config_toml.clone()),
                strs(&|r| r.run_dir.clone()),
                opt(&|r| r.faces.clone()),
                opt(&|r| r.cache.clone()),
                Arc::new(UInt64Array::from(records.iter().map(|r| r.cache_version).collect::<Vec<_>>())),
                opt(&|r| r.teacher.clone()),
                Arc::new(UInt64Array::from(records.iter().map(|r| r.step).collect::<Vec<_>>())),
                Arc::new(UInt64Array::from(records.iter().map(|r| r.total_steps).collect::<Vec<_>>())),
                strs(&|r| r.metrics_json.clone()),
                strs(&|r| r.error.clone()),
                Arc::new(Int64Array::from(records.iter().map(|r| r.created_at_ms).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(records.iter().map(|r| r.updated_at_ms).collect::<Vec<_>>())),
            ],
        )
        .map_err(|e| Error::Data(format!("run registry record batch: {e}")))?;
        let mode = if self.open().await?.is_some() { WriteMode::Append } else { WriteMode::Create };
        let reader = RecordBatchIterator::new(vec![Ok(batch)], schema());
        Dataset::write(reader, self.uri.as_str(), Some(WriteParams { mode, ..Default::default() }))
            .await
            .map_err(|e| lance_err("append", &self.uri, e))?;
        Ok(())
    }

    /// Every row, in the order written.
    pub async fn history(&self) -> Result<Vec<RunRecord>> {
        let Some(ds) = self.open().await? else { return Ok(vec![]) };
        let stream = ds.scan().try_into_stream().await.map_err(|e| lance_err("scan", &self.uri, e))?;
        let batches: Vec<RecordBatch> =
            stream.try_collect().await.map_err(|e| lance_err("scan", &self.uri, e))?;
        let mut out = Vec::new();
        for b in batches {
            let s = |n: &str| -> Result<&StringArray> {
                b.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or_else(|| {
                    Error::Data(format!("run registry `{}`: column `{n}` missing or not a string", self.uri))
                })
            };
            let u = |n: &str| -> Result<&UInt64Array> {
                b.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<UInt64Array>()).ok_or_else(|| {
                    Error::Data(format!("run registry `{}`: column `{n}` missing or not u64", self.uri))
                })
            };
            let i = |n: &str| -> Result<&Int64Array> {
                b.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<Int64Array>()).ok_or_else(|| {
                    Error::Data(format!("run registry `{}`: column `{n}` missing or not i64", self.uri))
                })
            };
            let (id, st, cfg, dir, faces, cache, cv, teacher, step, total, m, err, c, up) = (
                s("run_id")?,
                s("state")?,
                s("config_toml")?,
                s("run_dir")?,
                s("faces")?,
                s("cache")?,
                u("cache_version")?,
                s("teacher")?,
                u("step")?,
                u("total_steps")?,
                s("metrics_json")?,
                s("error")?,
                i("created_at_ms")?,
                i("updated_at_ms")?,
            );
            let os = |a: &StringArray, k: usize| (!a.is_null(k)).then(|| a.value(k).to_string());
            for k in 0..b.num_rows() {
                out.push(RunRecord {
                    run_id: id.value(k).into(),
                    state: st.value(k).into(),
                    config_toml: cfg.value(k).into(),
                    run_dir: dir.value(k).into(),
                    faces: os(faces, k),
                    cache: os(cache, k),
                    cache_version: (!cv.is_null(k)).then(|| cv.value(k)),
                    teacher: os(teacher, k),
                    step: step.value(k),
                    total_steps: total.value(k),
                    metrics_json: m.value(k).into(),
                    error: err.value(k).into(),
                    created_at_ms: c.value(k),
                    updated_at_ms: up.value(k),
                });
            }
        }
        Ok(out)
    }

    /// The current record of every run (the newest row per run id), newest run first.
    pub async fn latest(&self) -> Result<Vec<RunRecord>> {
        let mut by_id: HashMap<String, RunRecord> = HashMap::new();
        for r in self.history().await? {
            match by_id.get(&r.run_id) {
                Some(old) if old.updated_at_ms > r.updated_at_ms => {}
                _ => {
                    by_id.insert(r.run_id.clone(), r);
                }
            }
        }
        let mut v: Vec<RunRecord> = by_id.into_values().collect();
        v.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.run_id.cmp(&a.run_id)));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: &str, t: i64) -> RunRecord {
        RunRecord {
            run_id: id.into(),
            state: state.into(),
            config_toml: "seed = 1\n".into(),
            run_dir: format!("/runs/{id}"),
            faces: Some("faces.lance".into()),
            cache: None,
            cache_version: Some(3),
            teacher: None,
            step: 0,
            total_steps: 10,
            metrics_json: "{}".into(),
            error: String::new(),
            created_at_ms: 100,
            updated_at_ms: t,
        }
    }

    #[tokio::test]
    async fn records_round_trip_and_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        assert!(r.latest().await.unwrap().is_empty());
        r.append(&[rec("a", "pending", 100), rec("b", "pending", 100)]).await.unwrap();
        let mut done = rec("a", "completed", 200);
        done.metrics_json = r#"{"val/accuracy":0.5}"#.into();
        done.step = 10;
        r.append(&[done.clone()]).await.unwrap();
        assert_eq!(r.history().await.unwrap().len(), 3);
        let latest = r.latest().await.unwrap();
        assert_eq!(latest.len(), 2);
        let a = latest.iter().find(|x| x.run_id == "a").unwrap();
        assert_eq!(a, &done);
        assert_eq!(latest.iter().find(|x| x.run_id == "b").unwrap().state, "pending");
    }
}
