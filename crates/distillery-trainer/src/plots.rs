//! PNG figures of a run: loss curves, the confusion matrix and valence/arousal scatter plots.
//!
//! plotters renders text with ab_glyph, which needs a font registered at runtime. We look for a TTF
//! in `$DISTILLERY_FONT`, then in common system locations (DejaVu, Liberation, Noto) and finally
//! anywhere under `/usr/share/fonts`. When none exists the figures are still drawn — axes, grids,
//! lines, cells and points — but without any text (titles, tick labels, legends).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::train::MetricsLine;
use crate::{Error, Result};

const FONT_FAMILY: &str = "sans-serif";

const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn find_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = vec![];
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            subdirs.push(p);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
            return Some(p);
        }
    }
    if depth == 0 {
        return None;
    }
    subdirs.sort();
    subdirs.into_iter().find_map(|d| find_ttf(&d, depth - 1))
}

/// Registers a system font with plotters once; returns whether text can be drawn.
pub fn fonts_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let mut paths: Vec<PathBuf> =
            std::env::var_os("DISTILLERY_FONT").map(PathBuf::from).into_iter().collect();
        paths.extend(CANDIDATES.iter().map(PathBuf::from));
        paths.extend(find_ttf(Path::new("/usr/share/fonts"), 4));
        for p in paths {
            let Ok(bytes) = std::fs::read(&p) else { continue };
            // plotters keeps a 'static reference to the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(font = %p.display(), "plot font registered");
                return true;
            }
        }
        tracing::warn!("no TTF font found (set DISTILLERY_FONT); plots are drawn without text");
        false
    })
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot draw plot: {e}"))
}

const SERIES: [(&str, RGBColor); 7] = [
    ("total", RGBColor(0, 0, 0)),
    ("hard", RGBColor(31, 119, 180)),
    ("soft", RGBColor(255, 127, 14)),
    ("smooth_l1", RGBColor(44, 160, 44)),
    ("bound", RGBColor(214, 39, 40)),
    ("pseudo_va", RGBColor(140, 86, 75)),
    ("feature", RGBColor(148, 103, 189)),
];

/// Loss terms against step from the periodic lines of `metrics.jsonl` (terms that stay zero are
/// left out).
pub fn training_curves(lines: &[MetricsLine], path: &Path) -> Result<()> {
    let text = fonts_available();
    let pts: Vec<&MetricsLine> = lines.iter().filter(|l| l.kind == "step").collect();
    let pts: Vec<&MetricsLine> = if pts.is_empty() { lines.iter().collect() } else { pts };
    let value = |l: &MetricsLine, k: &str| match k {
        "total" => l.losses.total,
        "hard" => l.losses.hard,
        "soft" => l.losses.soft,
        "smooth_l1" => l.losses.smooth_l1,
        "bound" => l.losses.bound,
        "pseudo_va" => l.losses.pseudo_va,
        _ => l.losses.feature,
    };
    let max_step = pts.iter().map(|l| l.step).max().unwrap_or(1).max(1) as f64;
    let max_y = pts
        .iter()
        .flat_map(|l| SERIES.iter().map(move |(k, _)| value(l, k)))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.05;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption("training losses", (FONT_FAMILY, 22)).x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = b.build_cartesian_2d(0f64..max_step, 0f64..max_y).map_err(|e| draw_err(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| draw_err(path, e))?;
    for (name, color) in SERIES {
        if pts.iter().all(|l| value(l, name) == 0.0) {
            continue;
        }
        let s = chart
            .draw_series(LineSeries::new(
                pts.iter().map(|l| (l.step as f64, value(l, name))),
                color.stroke_width(2),
            ))
            .map_err(|e| draw_err(path, e))?;
        if text {
            s.label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// Row-normalised confusion matrix (`cm[truth][pred]`) as a heatmap, with counts when text works.
/// The first class is the top row.
pub fn confusion_heatmap(cm: &[Vec<u64>], classes: &[String], path: &Path) -> Result<()> {
    let text = fonts_available();
    let c = cm.len().max(1) as i32;
    let root = BitMapBackend::new(path, (720, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption("confusion (rows: truth, columns: prediction)", (FONT_FAMILY, 20))
            .x_label_area_size(70)
            .y_label_area_size(90);
    }
    let mut chart = b
        .build_cartesian_2d((0..c).into_segmented(), (0..c).into_segmented())
        .map_err(|e| draw_err(path, e))?;
    let name = |i: i32| classes.get(i as usize).cloned().unwrap_or_else(|| i.to_string());
    let xfmt = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => name(*i),
        _ => String::new(),
    };
    let yfmt = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => name(c - 1 - *i),
        _ => String::new(),
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_mesh();
    if text {
        mesh.x_labels(c as usize)
            .y_labels(c as usize)
            .x_label_formatter(&xfmt)
            .y_label_formatter(&yfmt)
            .x_desc("predicted")
            .y_desc("true");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| draw_err(path, e))?;
    for (t, row) in cm.iter().enumerate() {
        let sum: u64 = row.iter().sum();
        let y = c - 1 - t as i32;
        for (p, &v) in row.iter().enumerate() {
            let frac = if sum == 0 { 0.0 } else { v as f64 / sum as f64 };
            let shade = (255.0 * (1.0 - frac)) as u8;
            let color = RGBColor(shade, shade, 255);
            let p = p as i32;
            let cell = [
                (SegmentValue::Exact(p), SegmentValue::Exact(y)),
                (SegmentValue::Exact(p + 1), SegmentValue::Exact(y + 1)),
            ];
            chart
                .draw_series(std::iter::once(Rectangle::new(cell, color.filled())))
                .map_err(|e| draw_err(path, e))?;
            if text {
                let fg = if frac > 0.5 { WHITE } else { BLACK };
                let style = TextStyle::from((FONT_FAMILY, 16).into_font()).color(&fg);
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{v}"),
                        (SegmentValue::CenterOf(p), SegmentValue::CenterOf(y)),
                        style,
                    )))
                    .map_err(|e| draw_err(path, e))?;
            }
        }
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// Predicted against true valence (left) and arousal (right), each in [−1, 1] with the diagonal.
pub fn va_scatter(valence: &[(f64, f64)], arousal: &[(f64, f64)], path: &Path) -> Result<()> {
    let text = fonts_available();
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let panels = root.split_evenly((1, 2));
    for (area, (title, pts)) in panels.iter().zip([("valence", valence), ("arousal", arousal)]) {
        let mut b = ChartBuilder::on(area);
        b.margin(20);
        if text {
            b.caption(format!("{title}: prediction vs truth"), (FONT_FAMILY, 20))
                .x_label_area_size(40)
                .y_label_area_size(50);
        }
        let mut chart = b.build_cartesian_2d(-1.1f64..1.1, -1.1f64..1.1).map_err(|e| draw_err(path, e))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("true").y_desc("predicted");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| draw_err(path, e))?;
        chart
            .draw_series(LineSeries::new([(-1.1, -1.1), (1.1, 1.1)], RGBColor(150, 150, 150).stroke_width(1)))
            .map_err(|e| draw_err(path, e))?;
        chart
            .draw_series(pts.iter().map(|(p, t)| {
                Circle::new((*t, p.clamp(-1.1, 1.1)), 3, RGBColor(31, 119, 180).mix(0.6).filled())
            }))
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::StepLosses;

    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(&b[1..4], b"PNG", "{} is not a PNG", path.display());
        (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
    }

    #[test]
    fn figures_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<MetricsLine> = (1..=20)
            .map(|s| MetricsLine {
                kind: "step".into(),
                step: s * 10,
                epoch: 0,
                lr: 1e-3,
                steps: 10,
                rows: 320,
                losses: StepLosses {
                    hard: 2.0 / s as f64,
                    soft: 1.0 / s as f64,
                    smooth_l1: 0.5 / s as f64,
                    total: 3.5 / s as f64,
                    ..Default::default()
                },
            })
            .collect();
        let p = dir.path().join("curves.png");
        training_curves(&lines, &p).unwrap();
        assert_eq!(png_size(&p), (900, 560));
        let cm = vec![vec![5, 1, 0], vec![2, 7, 1], vec![0, 0, 4]];
        let p = dir.path().join("cm.png");
        confusion_heatmap(&cm, &["neutral".into(), "happy".into(), "sad".into()], &p).unwrap();
        assert_eq!(png_size(&p), (720, 680));
        let v: Vec<(f64, f64)> =
            (0..50).map(|i| ((i as f64 / 25.0 - 1.0) * 0.8, i as f64 / 25.0 - 1.0)).collect();
        let p = dir.path().join("va.png");
        va_scatter(&v, &v, &p).unwrap();
        assert_eq!(png_size(&p), (1000, 500));
        if let Ok(keep) = std::env::var("DISTILLERY_KEEP_PLOTS") {
            for f in ["curves.png", "cm.png", "va.png"] {
                std::fs::copy(dir.path().join(f), Path::new(&keep).join(f)).unwrap();
            }
        }
    }
}
