//! Small shared pieces: opening datasets with storage options, write parameters, typed column
//! access that reports the column by name, and collecting a scan.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::builder::DatasetBuilder;
use lance::dataset::scanner::Scanner;
use lance::dataset::{WriteMode, WriteParams};
use lance::io::{ObjectStoreParams, StorageOptionsAccessor};

use crate::{Error, Result, StorageOptions};

/// Opens the latest version of the dataset at `uri`; `Ok(None)` when there is none.
pub(crate) async fn try_open(uri: &str, opts: &StorageOptions) -> Result<Option<Dataset>> {
    let mut b = DatasetBuilder::from_uri(uri);
    if !opts.is_empty() {
        b = b.with_storage_options(opts.clone());
    }
    match b.load().await {
        Ok(ds) => Ok(Some(ds)),
        Err(lance::Error::DatasetNotFound { .. } | lance::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::lance("open", uri, e)),
    }
}

pub(crate) fn store_params(opts: &StorageOptions) -> Option<ObjectStoreParams> {
    if opts.is_empty() {
        return None;
    }
    Some(ObjectStoreParams {
        storage_options_accessor: Some(Arc::new(StorageOptionsAccessor::with_static_options(opts.clone()))),
        ..Default::default()
    })
}

pub(crate) fn write_params(opts: &StorageOptions, mode: WriteMode) -> WriteParams {
    WriteParams { mode, store_params: store_params(opts), ..Default::default() }
}

/// Runs a scan to completion.
pub(crate) async fn collect(scanner: &Scanner, uri: &str) -> Result<Vec<RecordBatch>> {
    let stream = scanner.try_into_stream().await.map_err(|e| Error::lance("scan", uri, e))?;
    stream.try_collect::<Vec<_>>().await.map_err(|e| Error::lance("scan", uri, e))
}

/// The column `name` of `batch` downcast to `T`, or an error naming the column.
pub(crate) fn col<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str, uri: &str) -> Result<&'a T> {
    let c = batch.column_by_name(name).ok_or_else(|| Error::column(uri, name, "missing"))?;
    c.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| Error::column(uri, name, format!("unexpected type {}", c.data_type())))
}

/// Quotes a string for a Lance SQL filter.
pub(crate) fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
