//! Saves a grid of synthetic faces for a human look: one row per EmoNet class, columns sorted by
//! intensity (row = class in EmoNet order), and times generating 2,000 64² face records.
//!
//! `cargo run -p distillery-data --example synth_grid -- [OUT.png] [SEED] [SIZE] [COLS]`

#![allow(clippy::print_stdout)]

use distillery_data::synth::{SynthConfig, class_name, class_of, generate_batch, generate_one};
use image::{RgbImage, imageops};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).cloned().unwrap_or_else(|| "synth_grid.png".into());
    let seed: u64 = args.get(2).map_or(0, |s| s.parse().expect("SEED is an integer"));
    let size: u32 = args.get(3).map_or(64, |s| s.parse().expect("SIZE is an integer"));
    let cols: usize = args.get(4).map_or(10, |s| s.parse().expect("COLS is an integer"));
    let zoom = (128 / size).max(1);
    let tile = size * zoom + 2;
    let mut grid = RgbImage::from_pixel(tile * cols as u32, tile * 8, image::Rgb([255, 255, 255]));
    for class in 0..8u32 {
        let mut faces: Vec<_> = (0..)
            .filter(|i| class_of(seed, *i) == class)
            .take(cols)
            .map(|i| generate_one(seed, i, size))
            .collect();
        faces.sort_by(|a, b| a.1.intensity.total_cmp(&b.1.intensity));
        let summary: Vec<String> =
            faces.iter().map(|(_, l)| format!("{:+.2}/{:+.2}", l.valence, l.arousal)).collect();
        println!("row {class} {:<9} v/a: {}", class_name(class), summary.join(" "));
        for (c, (img, _)) in faces.iter().enumerate() {
            let big = imageops::resize(img, size * zoom, size * zoom, imageops::FilterType::Nearest);
            imageops::replace(&mut grid, &big, (c as u32 * tile) as i64, (class * tile) as i64);
        }
    }
    grid.save(&out).expect("write grid PNG");
    println!("wrote {out}");

    // Throughput of the full record path (draw, PNG-encode, hash) on all cores.
    let cfg = SynthConfig { count: 2000, size: 64, seed, ..SynthConfig::default() };
    let t = std::time::Instant::now();
    let faces = generate_batch(&cfg, 0..cfg.count);
    let bytes: usize = faces.iter().map(|f| f.image.len()).sum();
    println!(
        "generated {} 64² faces in {:.2} s ({} KiB of PNG)",
        faces.len(),
        t.elapsed().as_secs_f64(),
        bytes / 1024
    );
}
