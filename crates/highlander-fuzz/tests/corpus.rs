//! Replays every stored fuzz input — the seed corpora in `fuzz/corpus/<target>/` and any
//! reproduction kept in `fuzz/regressions/<target>/` — through the targets, on stable, as
//! part of `cargo test --workspace`. A fuzzer finding becomes a permanent test by copying
//! its artifact into `fuzz/regressions/<target>/`.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_stored_input_runs_clean() {
    let mut total = 0;
    for target in highlander_fuzz::TARGETS {
        let mut files = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(!files.is_empty(), "no seed corpus for {target}: run the seed generator");
        files.extend(inputs(&fuzz_dir().join("regressions").join(target)));
        for file in &files {
            let data = std::fs::read(file).expect("a corpus file reads");
            highlander_fuzz::run(target, &data);
        }
        println!("{target}: {} inputs", files.len());
        total += files.len();
    }
    println!("{total} inputs replayed");
}

/// Writes the seed corpora: a few valid and a few broken inputs per target. Run with
/// `cargo test -p highlander-fuzz --test corpus -- --ignored` after changing a wire type.
#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing a wire format"]
fn write_seed_corpus() {
    for (target, seeds) in highlander_fuzz::seeds::all() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
