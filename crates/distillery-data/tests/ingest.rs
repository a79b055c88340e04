//! Ingest parsers on real files: the reference photos, class folders with corrupt files mixed in, and
//! AffectNet CSVs with skipped and malformed rows.

use std::path::{Path, PathBuf};

use distillery_core::{ClassSet, FaceId};
use distillery_data::ingest::{
    IngestError, IngestOutput, IngestReport, affectnet, canonical_class, folder, manifest, validate_image,
};
use distillery_data::synth::{encode_png, generate_one};
use distillery_data::{Reject, Split};

fn synth_png(i: u64) -> Vec<u8> {
    encode_png(&generate_one(1234, i, 32).0)
}

fn synth_jpeg(i: u64) -> Vec<u8> {
    let img = generate_one(1234, i, 40).0;
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// A PNG whose (valid, CRC-correct) header claims `w`×`h` pixels, followed by a tiny IDAT and IEND.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn reasons(rejects: &[Reject]) -> Vec<(Option<u64>, String)> {
    rejects.iter().map(|r| (r.row, r.reason.clone())).collect()
}

#[test]
fn validate_image_accepts_images_and_names_each_defect() {
    let png = synth_png(0);
    assert_eq!(validate_image(&png), Ok((32, 32)));
    let jpg = synth_jpeg(0);
    assert_eq!(validate_image(&jpg), Ok((40, 40)));

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "empty file (0 bytes)"),
        ("text", b"hello, I am not a picture\n".to_vec(), "not an image"),
        ("truncated png", png[..png.len() / 2].to_vec(), "cannot decode PNG"),
        ("truncated jpeg", jpg[..jpg.len() * 2 / 3].to_vec(), "truncated JPEG"),
        ("bomb", png_claiming(100_000, 100_000), "claims 100000×100000 pixels"),
        ("wide", png_claiming(9000, 10), "claims 9000×10 pixels"),
        ("64MP+", png_claiming(8000, 8100), "claims 8000×8100 pixels"),
        ("gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(), "unsupported image format Gif"),
        ("header only", png[..20].to_vec(), "PNG"),
    ];
    for (name, bytes, want) in cases {
        let err = validate_image(&bytes).expect_err(name);
        assert!(err.contains(want), "{name}: `{err}` lacks `{want}`");
    }
}

/// One face of faces.json.
struct RefFace {
    image: String,
    bx: [f32; 4],
    label: String,
}

fn reference_faces(dir: &Path) -> Vec<RefFace> {
    let text = std::fs::read_to_string(dir.join("faces/faces.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let classes: Vec<String> =
        v["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    v["faces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["is_face"].as_bool().unwrap())
        .map(|f| {
            let b: Vec<f32> =
                f["box_xywh"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let probs: Vec<f64> = f["faceapi_onnxruntime_probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let best = (0..probs.len()).max_by(|a, b| probs[*a].total_cmp(&probs[*b])).unwrap();
            RefFace {
                image: f["image"].as_str().unwrap().to_string(),
                bx: [b[0], b[1], b[2], b[3]],
                label: classes[best].clone(),
            }
        })
        .collect()
}

#[test]
fn manifest_of_real_photos_csv_and_jsonl_agree() {
    let Some(reference) = distillery_core::reference::require("manifest_of_real_photos") else {
        return;
    };
    let faces = reference_faces(&reference);
    assert_eq!(faces.len(), 18);
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(reference.join("faces/images"), tmp.path().join("images")).unwrap();

    let mut csv = String::from("path,x,y,w,h,label,valence,arousal,split\n");
    let mut jsonl = String::new();
    for (i, f) in faces.iter().enumerate() {
        let split = ["train", "val", "test"][i % 3];
        let [x, y, w, h] = f.bx;
        csv += &format!("images/{},{x},{y},{w},{h},{},,,{split}\n", f.image, f.label);
        jsonl += &format!(
            "{{\"path\":\"images/{}\",\"box\":[{x},{y},{w},{h}],\"label\":\"{}\",\"split\":\"{split}\"}}\n",
            f.image, f.label
        );
    }
    // Rows 20..=23: a duplicate of the first face, a box off the image, a missing file, a bad label.
    let [x, y, w, h] = faces[0].bx;
    csv += &format!("images/{},{x},{y},{w},{h},{},,,train\n", faces[0].image, faces[0].label);
    csv += "images/astronaut.png,600,10,50,50,happy,,,train\n";
    csv += "images/nope.jpg,1,1,10,10,happy,,,train\n";
    csv += "images/sample1.jpg,1,1,10,10,joyful,,,train\n";
    std::fs::write(tmp.path().join("faces.csv"), csv).unwrap();
    std::fs::write(tmp.path().join("faces.jsonl"), jsonl).unwrap();

    let opts = manifest::ManifestOptions::default();
    let out = manifest::open(&tmp.path().join("faces.csv"), &opts).unwrap().chunk_size(5).collect_all();
    assert_eq!(out.report, IngestReport { accepted: 18, rejected: 3, skipped: 0, duplicates: 1 });
    let got = reasons(&out.rejects);
    assert_eq!(got[0].0, Some(21));
    assert!(got[0].1.contains("lies outside the 512×512 image"), "{got:?}");
    assert_eq!(got[1].0, Some(22));
    assert!(got[1].1.starts_with("cannot read file"), "{got:?}");
    assert!(out.rejects[1].source.ends_with("images/nope.jpg"));
    assert_eq!(got[2], (Some(23), "field `label`: `joyful` is not one of the classes [neutral, happy, sad, surprise, fear, disgust, anger, contempt]".into()));

    let classes = ClassSet::emonet8();
    for (i, (rec, f)) in out.faces.iter().zip(&faces).enumerate() {
        assert_eq!(rec.box_xywh, Some(f.bx));
        assert_eq!(rec.label, classes.index_of(&canonical_class(&f.label)).map(|l| l as u32));
        assert_eq!(rec.split, Split::ALL[i % 3]);
        assert_eq!(rec.valence, None);
        assert_eq!(rec.id, FaceId::of(&rec.image, Some(f.bx)));
        let on_disk = std::fs::read(reference.join("faces/images").join(&f.image)).unwrap();
        assert_eq!(rec.image, on_disk, "bytes are stored untouched");
        let img = image::load_from_memory(&on_disk).unwrap();
        assert_eq!((rec.width, rec.height), (img.width(), img.height()));
    }

    let js = manifest::open(&tmp.path().join("faces.jsonl"), &opts).unwrap().collect_all();
    assert_eq!(js.report, IngestReport { accepted: 18, ..IngestReport::default() });
    let ids = |o: &IngestOutput| o.faces.iter().map(|f| f.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&js), ids(&out));
}

#[test]
fn manifest_rows_are_checked_field_by_field() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("a.png"), &synth_png(1));
    let jsonl = [
        r#"{"path":"a.png","label":2,"valence":-0.5,"arousal":0.25}"#,
        r#"{"path":"a.png","label":9}"#,
        r#"{"path":"a.png","valence":1.5}"#,
        "",
        r#"{"path":"a.png","colour":"red"}"#,
        r#"{"path":"a.png","x":1,"y":2}"#,
        r#"{"path":"a.png","split":"holdout"}"#,
        r#"not json"#,
        r#"{"label":"happy"}"#,
        r#"{"path":"a.png","box":[0,0,8,8],"label":"Surprised","split":"val"}"#,
    ]
    .join("\n");
    let path = tmp.path().join("m.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    let out = manifest::open(&path, &manifest::ManifestOptions::default()).unwrap().collect_all();
    assert_eq!(out.report, IngestReport { accepted: 2, rejected: 7, skipped: 0, duplicates: 0 });
    let got = reasons(&out.rejects);
    let want = [
        (2, "field `label`: 9 is not a class index (0..=7)"),
        (3, "field `valence`: 1.5 is outside [-1, 1]"),
        (5, "unknown field `colour`"),
        (6, "fields `x, y, w, h` must be all given or all empty"),
        (7, "field `split`: `holdout` is not train, val or test"),
        (8, "malformed JSON"),
        (9, "field `path` is missing or empty"),
    ];
    for ((row, reason), (wrow, wreason)) in got.iter().zip(want) {
        assert_eq!(*row, Some(wrow));
        assert!(reason.starts_with(wreason), "row {wrow}: `{reason}` vs `{wreason}`");
    }
    assert!(out.rejects.iter().all(|r| r.source == path.display().to_string()));
    let f = &out.faces[0];
    assert_eq!((f.label, f.valence, f.arousal, f.box_xywh), (Some(2), Some(-0.5), Some(0.25), None));
    let g = &out.faces[1];
    assert_eq!((g.label, g.split, g.box_xywh), (Some(3), Split::Val, Some([0.0, 0.0, 8.0, 8.0])));

    // CSV: unknown columns and partial boxes fail the open, naming the column.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "path,valance\na.png,0.1\n").unwrap();
    let e = manifest::open(&bad, &manifest::ManifestOptions::default()).err().unwrap();
    assert!(e.to_string().contains("unknown column `valance`"), "{e}");
    std::fs::write(&bad, "path,x,y\na.png,1,2\n").unwrap();
    assert!(matches!(manifest::open(&bad, &Default::default()), Err(IngestError::Invalid { .. })));
    let e = manifest::open(&tmp.path().join("m.txt"), &Default::default()).err().unwrap();
    assert!(e.to_string().contains(".csv, .jsonl"), "{e}");
}

#[test]
fn class_folders_with_corrupt_files_mixed_in() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut good = 0;
    for (k, class) in ["happy", "Angry", "sadness", "neutral"].iter().enumerate() {
        for j in 0..3u64 {
            write(&root.join(format!("train/{class}/{j}.png")), &synth_png(k as u64 * 10 + j));
            good += 1;
        }
        write(&root.join(format!("test/{class}/t.jpg")), &synth_jpeg(100 + k as u64));
        good += 1;
    }
    if let Some(reference) = distillery_core::reference::require("class_folders (real photos)") {
        for name in ["sample1.jpg", "astronaut.png"] {
            std::fs::copy(reference.join("faces/images").join(name), root.join("train/happy").join(name))
                .unwrap();
            good += 1;
        }
    }
    // Corrupt files, and files that are not images at all.
    let jpg = synth_jpeg(7);
    write(&root.join("train/happy/zero.png"), &[]);
    write(&root.join("train/Angry/cut.jpg"), &jpg[..jpg.len() / 2]);
    write(&root.join("train/sadness/readme.jpg"), b"this is a text file\n");
    write(&root.join("test/neutral/bomb.png"), &png_claiming(100_000, 100_000));
    write(&root.join("train/happy/notes.txt"), b"not a face");
    write(&root.join("train/happy/.DS_Store"), b"\0\0");
    write(&root.join("README.md"), b"dataset");
    // A byte-identical copy under another name.
    write(&root.join("train/happy/copy.png"), &synth_png(0));

    let out = folder::open(root, &folder::FolderOptions::default()).unwrap().chunk_size(3).collect_all();
    assert_eq!(out.report, IngestReport { accepted: good, rejected: 4, skipped: 3, duplicates: 1 });
    let mut got: Vec<(String, String)> = out
        .rejects
        .iter()
        .map(|r| (r.source.strip_prefix(&root.display().to_string()).unwrap().to_string(), r.reason.clone()))
        .collect();
    got.sort();
    assert_eq!(got[0].0, "/test/neutral/bomb.png");
    assert!(got[0].1.starts_with("PNG claims 100000×100000 pixels, over the limit"), "{}", got[0].1);
    assert_eq!(
        got[1],
        ("/train/Angry/cut.jpg".into(), "truncated JPEG: no end-of-image marker after the last scan".into())
    );
    assert_eq!(got[2].0, "/train/happy/zero.png");
    assert_eq!(got[2].1, "empty file (0 bytes)");
    assert_eq!(got[3].0, "/train/sadness/readme.jpg");
    assert!(
        got[3].1.starts_with("not an image: unrecognised content starting with bytes 74 68 69 73"),
        "{}",
        got[3].1
    );
    assert!(out.rejects.iter().all(|r| r.row.is_none()));

    let classes = ClassSet::emonet8();
    for f in &out.faces {
        let rel = f.source.strip_prefix(&root.display().to_string()).unwrap();
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(f.split, Split::parse(parts[1]).unwrap());
        let want = classes.index_of(&canonical_class(parts[2])).unwrap() as u32;
        assert_eq!(f.label, Some(want), "{rel}");
        assert_eq!(f.box_xywh, None);
    }
    assert_eq!(out.faces.iter().filter(|f| f.split == Split::Test).count(), 4);
    assert_eq!(out.faces.iter().filter(|f| f.label == Some(6)).count(), 4, "Angry → anger");
}

#[test]
fn folder_layout_errors_and_options() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(&root.join("happy/a.png"), &synth_png(1));
    write(&root.join("surprised/b.png"), &synth_png(2));
    write(&root.join("contempt/c.png"), &synth_png(3));
    // Without a split level every face gets the configured split.
    let opts = folder::FolderOptions { split: Split::Val, ..Default::default() };
    let out = folder::open(root, &opts).unwrap().collect_all();
    assert_eq!(out.report.accepted, 3);
    assert!(out.faces.iter().all(|f| f.split == Split::Val));
    assert_eq!(out.faces.iter().map(|f| f.label.unwrap()).collect::<Vec<_>>(), vec![7, 1, 3]);

    // A 5-class set does not know contempt: an error unless unknown classes are skipped.
    let five = folder::FolderOptions { classes: ClassSet::emonet5(), ..Default::default() };
    let e = folder::open(root, &five).err().unwrap().to_string();
    assert!(e.contains("folder `contempt` is not one of the classes"), "{e}");
    let five = folder::FolderOptions { skip_unknown_classes: true, ..five };
    let out = folder::open(root, &five).unwrap().collect_all();
    assert_eq!(out.report, IngestReport { accepted: 2, rejected: 0, skipped: 1, duplicates: 0 });

    write(&root.join("train/happy/d.png"), &synth_png(4));
    let e = folder::open(root, &Default::default()).err().unwrap().to_string();
    assert!(e.contains("mixes split folders and class folders"), "{e}");
}

const HEADER: &str =
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal";

#[test]
fn affectnet_csv_rows_are_kept_skipped_or_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("Manually_Annotated_Images");
    for i in 0..8u64 {
        write(&images.join(format!("{}/{i}.png", 100 + i % 2)), &synth_png(i));
    }
    write(&images.join("7/real.jpg"), &synth_jpeg(50));
    let lm = "\"1.0;2.0;3.0;4.0\"";
    let mut csv = format!("{HEADER}\n");
    // Lines 2..=9: expressions 0–7, all kept.
    for i in 0..8u64 {
        csv +=
            &format!("{}/{i}.png,2,3,20,24,{lm},{i},{:.3},{:.3}\n", 100 + i % 2, i as f32 * 0.1 - 0.4, 0.2);
    }
    csv += &format!("7/real.jpg,0,0,40,40,{lm},8,0.1,0.1\n"); // 10: none → skipped
    csv += &format!("7/real.jpg,0,0,40,40,{lm},9,0.1,0.1\n"); // 11: uncertain → skipped
    csv += &format!("7/real.jpg,0,0,40,40,{lm},10,-2,-2\n"); // 12: no face → skipped
    csv += &format!("7/real.jpg,1,1,30,30,{lm},1,-2,-2\n"); // 13: kept, v/a missing
    csv += "100/0.png,2,3,20,24,1;2\n"; // 14: too few fields
    csv += &format!("100/0.png,two,3,20,24,{lm},1,0,0\n"); // 15: bad face_x
    csv += &format!("100/0.png,2,3,20,24,{lm},11,0,0\n"); // 16: expression out of range
    csv += &format!("100/0.png,2,3,20,24,{lm},1,1.5,0\n"); // 17: valence out of range
    csv += &format!("100/0.png,2,3,0,24,{lm},1,0,0\n"); // 18: empty box
    csv += &format!("404/gone.jpg,2,3,20,24,{lm},1,0,0\n"); // 19: missing image
    csv += &format!("100/0.png,2,3,20,24,{lm},0,-0.400,0.200\n"); // 20: duplicate of line 2
    csv += &format!("101/1.png,2,3,20,24,{lm},happy,0,0\n"); // 21: non-integer expression
    let path = tmp.path().join("training.csv");
    std::fs::write(&path, &csv).unwrap();

    let opts = affectnet::AffectNetOptions::new(&images, Split::Train);
    let out = affectnet::open(&path, &opts).unwrap().chunk_size(4).collect_all();
    assert_eq!(out.report, IngestReport { accepted: 9, rejected: 7, skipped: 3, duplicates: 1 });
    let want: Vec<(Option<u64>, String)> = vec![
        (Some(14), "expected 9 fields, found 6".into()),
        (Some(15), "field `face_x`: `two` is not a finite number".into()),
        (Some(16), "field `expression`: 11 is not in 0..=10".into()),
        (Some(17), "field `valence`: 1.5 is outside [-1, 1]".into()),
        (
            Some(18),
            "face box [2.0, 3.0, 0.0, 24.0] needs non-negative x, y and positive width, height".into(),
        ),
        (Some(19), String::new()),
        (Some(21), "field `expression`: `happy` is not an integer".into()),
    ];
    let got = reasons(&out.rejects);
    for (g, w) in got.iter().zip(&want) {
        if w.1.is_empty() {
            assert_eq!(g.0, w.0);
            assert!(g.1.starts_with("cannot read file"), "{g:?}");
        } else {
            assert_eq!(g, w);
        }
    }
    assert_eq!(got.len(), want.len());
    assert!(out.rejects[5].source.ends_with("404/gone.jpg"));
    assert!(out.rejects[0].source.ends_with("training.csv"));

    let labels: Vec<u32> = out.faces.iter().map(|f| f.label.unwrap()).collect();
    assert_eq!(labels, vec![0, 1, 2, 3, 4, 5, 6, 7, 1]);
    let f0 = &out.faces[0];
    assert_eq!(f0.box_xywh, Some([2.0, 3.0, 20.0, 24.0]));
    assert_eq!((f0.valence, f0.arousal), (Some(-0.4), Some(0.2)));
    assert_eq!((f0.width, f0.height), (32, 32));
    let real = &out.faces[8];
    assert_eq!((real.valence, real.arousal, real.width), (None, None, 40));
    assert!(out.faces.iter().all(|f| f.split == Split::Train));

    // 5-class: expressions 5–7 are skipped too; keeping unlabelled rows keeps 5–9 without labels.
    let five = affectnet::AffectNetOptions { five_class: true, ..opts.clone() };
    let out5 = affectnet::open(&path, &five).unwrap().collect_all();
    assert_eq!(out5.report, IngestReport { accepted: 6, rejected: 7, skipped: 6, duplicates: 1 });
    let keep = affectnet::AffectNetOptions { keep_unlabelled: true, ..five };
    let outk = affectnet::open(&path, &keep).unwrap().collect_all();
    // 8 and 9 point at the same image and box as each other: the second is a duplicate.
    assert_eq!(outk.report, IngestReport { accepted: 10, rejected: 7, skipped: 1, duplicates: 2 });
    assert_eq!(outk.faces.iter().filter(|f| f.label.is_none()).count(), 4);

    // The header is optional (AffectNet's validation.csv has none); a wrong header is an error.
    let headerless = tmp.path().join("validation.csv");
    std::fs::write(&headerless, csv.split_once('\n').unwrap().1).unwrap();
    let outv = affectnet::open(&headerless, &affectnet::AffectNetOptions::new(&images, Split::Val)).unwrap();
    let outv = outv.collect_all();
    assert_eq!(outv.report, out.report);
    assert_eq!(outv.rejects[0].row, Some(13), "line numbers count from the first data line");
    assert!(outv.faces.iter().all(|f| f.split == Split::Val));
    std::fs::write(&headerless, "path,x,y,w,h,lm,expression,valence,arousal\n").unwrap();
    let e = affectnet::open(&headerless, &opts).err().unwrap().to_string();
    assert!(e.contains("header is [path, x, y") && e.contains("expected [subDirectory_filePath"), "{e}");
    let e = affectnet::open(&tmp.path().join("missing.csv"), &opts).err().unwrap();
    assert!(matches!(e, IngestError::Io { .. }), "{e}");
}

#[test]
fn chunking_does_not_change_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let mut csv = String::from("path,label\n");
    for i in 0..9u64 {
        write(&tmp.path().join(format!("{i}.png")), &synth_png(i % 6));
        csv += &format!("{i}.png,{}\n", i % 8);
    }
    csv += "missing.png,1\n";
    let path: PathBuf = tmp.path().join("m.csv");
    std::fs::write(&path, csv).unwrap();
    let run = |n: usize| manifest::open(&path, &Default::default()).unwrap().chunk_size(n).collect_all();
    let whole = run(100);
    assert_eq!(whole.report, IngestReport { accepted: 6, rejected: 1, skipped: 0, duplicates: 3 });
    for n in [1, 2, 4] {
        let o = run(n);
        assert_eq!(o.report, whole.report);
        assert_eq!(o.faces, whole.faces);
        assert_eq!(o.rejects, whole.rejects);
    }
    // The report grows as chunks are consumed.
    let mut ing = manifest::open(&path, &Default::default()).unwrap().chunk_size(5);
    let first = ing.next().unwrap();
    assert_eq!(first.faces.len(), 5);
    assert_eq!(ing.report().accepted, 5);
}
