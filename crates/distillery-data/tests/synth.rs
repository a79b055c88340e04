//! The synthetic face generator: determinism, balance, label consistency and variety.

use distillery_core::FaceId;
use distillery_data::Split;
use distillery_data::synth::{
    CLASS_VA, SynthConfig, class_of, generate, generate_batch, generate_one, record, split_of,
};

fn cfg(seed: u64) -> SynthConfig {
    SynthConfig { count: 24, size: 48, seed, ..SynthConfig::default() }
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let a = generate_batch(&cfg(7), 0..12);
    let b = generate_batch(&cfg(7), 0..12);
    assert_eq!(a, b);
    let c = generate_batch(&cfg(8), 0..12);
    for (x, y) in a.iter().zip(&c) {
        assert_ne!(x.image, y.image, "{} and {} are identical", x.source, y.source);
    }
    // Order of generation does not matter: face 5 alone equals face 5 of the batch.
    assert_eq!(record(&cfg(7), 5), a[5]);
}

#[test]
fn streaming_generate_matches_batches() {
    let c = SynthConfig { count: 10, ..cfg(3) };
    let all: Vec<_> = generate(c.clone()).collect();
    assert_eq!(all.len(), 10);
    assert_eq!(all, generate_batch(&c, 0..10));
}

#[test]
fn records_are_complete_and_decode() {
    let r = record(&cfg(11), 3);
    assert_eq!(r.source, "synth:11:3");
    assert_eq!(r.id, FaceId::of(&r.image, None));
    assert_eq!(r.box_xywh, None);
    assert_eq!((r.width, r.height), (48, 48));
    let img = image::load_from_memory(&r.image).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
    assert_eq!(r.label, Some(class_of(11, 3)));
    assert!(r.valence.is_some() && r.arousal.is_some());
}

#[test]
fn classes_are_balanced_in_every_block_of_eight() {
    for seed in [0, 1, 99] {
        let mut counts = [0u32; 8];
        for i in 0..800 {
            counts[class_of(seed, i) as usize] += 1;
            if i % 8 == 7 {
                assert!(counts.iter().all(|&c| c as u64 == (i + 1) / 8), "seed {seed} at {i}: {counts:?}");
            }
        }
    }
    // The order within blocks is not the same everywhere.
    let block = |b: u64| (0..8).map(|i| class_of(0, b * 8 + i)).collect::<Vec<_>>();
    assert!((1..20).any(|b| block(b) != block(0)));
}

#[test]
fn split_fractions_are_followed() {
    let n = 20_000;
    let mut counts = [0usize; 3];
    for i in 0..n {
        let k = match split_of(5, i, [0.8, 0.1, 0.1]) {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        };
        counts[k] += 1;
    }
    let f = counts.map(|c| c as f64 / n as f64);
    assert!((f[0] - 0.8).abs() < 0.015 && (f[1] - 0.1).abs() < 0.01 && (f[2] - 0.1).abs() < 0.01, "{f:?}");
    assert!((0..100).all(|i| split_of(5, i, [0.0, 0.0, 1.0]) == Split::Test));
}

#[test]
fn valence_arousal_follow_the_circumplex_and_intensity() {
    let n_per = 24;
    let mut sum = [[0f32; 2]; 8];
    let mut by_class: Vec<Vec<(f32, f32, f32)>> = vec![Vec::new(); 8];
    for i in 0..(8 * n_per) as u64 {
        let (_, l) = generate_one(21, i, 24);
        assert!((-1.0..=1.0).contains(&l.valence) && (-1.0..=1.0).contains(&l.arousal), "{l:?}");
        assert_eq!(l.label, class_of(21, i));
        sum[l.label as usize][0] += l.valence / n_per as f32;
        sum[l.label as usize][1] += l.arousal / n_per as f32;
        by_class[l.label as usize].push((l.intensity, l.valence, l.arousal));
    }
    let [neutral, happy, sad, surprise, fear, disgust, anger, contempt] = sum;
    assert!(happy[0] > 0.25 && sad[0] < -0.2, "happy {happy:?} sad {sad:?}");
    assert!(neutral[0].abs() < 0.05 && neutral[1].abs() < 0.05, "neutral {neutral:?}");
    for (name, m) in [("fear", fear), ("anger", anger), ("disgust", disgust), ("contempt", contempt)] {
        assert!(m[0] < -0.1, "{name} valence {m:?}");
    }
    for (name, m) in [("surprise", surprise), ("fear", fear), ("anger", anger)] {
        assert!(m[1] > 0.3 && m[1] > sad[1] + 0.5, "{name} arousal {m:?}");
    }
    assert!(sad[1] < -0.1, "sad arousal {sad:?}");
    // Intensity drives the distance from neutral: strong happy faces are happier than weak ones.
    let happy_faces = &by_class[1];
    let (lo, hi): (Vec<_>, Vec<_>) = happy_faces.iter().partition(|(t, _, _)| *t < 0.6);
    let mean = |v: &[&(f32, f32, f32)]| v.iter().map(|x| x.1).sum::<f32>() / v.len() as f32;
    assert!(!lo.is_empty() && !hi.is_empty());
    assert!(mean(&hi) > mean(&lo) + 0.15, "weak {} strong {}", mean(&lo), mean(&hi));
}

#[test]
fn faces_of_one_class_differ() {
    let seed = 4;
    let same: Vec<u64> = (0..64).filter(|i| class_of(seed, *i) == 1).collect();
    assert_eq!(same.len(), 8);
    let imgs: Vec<_> = same.iter().map(|i| generate_one(seed, *i, 32).0).collect();
    for a in 0..imgs.len() {
        for b in a + 1..imgs.len() {
            let d: f64 = imgs[a]
                .as_raw()
                .iter()
                .zip(imgs[b].as_raw())
                .map(|(x, y)| (*x as f64 - *y as f64).abs())
                .sum::<f64>()
                / imgs[a].as_raw().len() as f64;
            assert!(d > 10.0, "faces {} and {} differ by only {d:.1} grey levels", same[a], same[b]);
        }
    }
}

#[test]
fn class_va_table_is_in_range() {
    assert!(CLASS_VA.iter().flatten().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(CLASS_VA[0], [0.0, 0.0]);
}

#[test]
fn invalid_configs_name_the_field() {
    let e = SynthConfig { size: 4, ..SynthConfig::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("synth.size"), "{e}");
    let e =
        SynthConfig { split: [0.8, 0.1, 0.2], ..SynthConfig::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("synth.split"), "{e}");
    SynthConfig::default().validate().unwrap();
}
