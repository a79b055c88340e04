//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `RUN_DIR/checkpoint/` holds `weights.safetensors` (every model variable, running statistics
//! included), `optim.safetensors` (AdamW moments and step counts) and `state.json` (step, data
//! position, partial epoch sums). A checkpoint is written to `checkpoint.tmp/` and then renamed into
//! place, so a run killed mid-write still has its previous checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
use crate::{Error, Result};

/// Loop state stored with a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// The data source's position of the next batch.
    pub data_position: serde_json::Value,
    /// Sums of the current (partial) epoch, so its metrics line is the same after a resume.
    pub epoch_sums: crate::train::LossSums,
    /// Sums since the last periodic metrics line.
    pub window_sums: crate::train::LossSums,
}

/// Directory of the checkpoint inside a run directory.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Writes a checkpoint of `vars`, `opt` and `state` into `run_dir`, replacing the previous one.
pub fn save(run_dir: &Path, vars: &[(String, Var)], opt: &AdamW, state: &TrainState) -> Result<()> {
    let tmp = run_dir.join("checkpoint.tmp");
    let old = run_dir.join("checkpoint.old");
    let fin = dir(run_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights: HashMap<String, Tensor> =
        vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let wpath = tmp.join("weights.safetensors");
    candle_core::safetensors::save(&weights, &wpath)
        .map_err(|e| Error::Tensor { op: format!("save {}", wpath.display()), source: e })?;
    opt.save(&tmp.join("optim.safetensors"))?;
    let spath = tmp.join("state.json");
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&spath, text).map_err(|e| Error::io(&spath, e))?;
    if fin.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(&fin, &old).map_err(|e| Error::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&tmp, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The checkpoint directory to resume from: `checkpoint/`, or `checkpoint.old/` when a run died
/// between the two renames of [`save`].
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    [dir(run_dir), run_dir.join("checkpoint.old")].into_iter().find(|d| d.join("state.json").is_file())
}

/// Loads the latest checkpoint of `run_dir` into `vars` and `opt`; `None` when there is none.
pub fn load(run_dir: &Path, vars: &[(String, Var)], opt: &mut AdamW) -> Result<Option<TrainState>> {
    let Some(cdir) = latest(run_dir) else { return Ok(None) };
    let spath = cdir.join("state.json");
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| Error::format(&spath, format!("bad checkpoint state: {e}")))?;
    let wpath = cdir.join("weights.safetensors");
    let weights = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .map_err(|e| Error::format(&wpath, format!("cannot read weights: {e}")))?;
    for (name, var) in vars {
        let w =
            weights.get(name).ok_or_else(|| Error::format(&wpath, format!("missing variable `{name}`")))?;
        if w.dims() != var.dims() {
            return Err(Error::format(
                &wpath,
                format!("variable `{name}` has shape {:?}, model has {:?}", w.dims(), var.dims()),
            ));
        }
        let w = w.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&w).map_err(|e| Error::Tensor { op: format!("restore `{name}`"), source: e })?;
    }
    opt.load(&cdir.join("optim.safetensors"))?;
    Ok(Some(state))
}
