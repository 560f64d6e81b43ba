//! The bounded fuzz pass of CI: the three fuzz targets of `fuzz/` (the same bodies,
//! in `snapfs::fuzzing`) over the committed seed corpora, the minimized findings in
//! `tests/fixtures/fuzz/<target>/`, and a fixed number of deterministic mutations of
//! each (bit flips, interesting values, truncations, splices, insertions, erasures).
//! No cargo-fuzz, no mount; a few seconds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use snapfs::fuzzing::{self, Outcome, Rng};

/// Mutated cases per seed file.
const MUTATIONS_PER_SEED: usize = 400;

type Target = fn(&[u8]) -> Outcome;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [
        root.join("fuzz/corpus").join(target),
        root.join("tests/fixtures/fuzz").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).unwrap();
            out.push((p, bytes));
        }
    }
    assert!(!out.is_empty(), "no seed corpus for {target}");
    out
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    512,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 63,
    u64::MAX,
];

/// One to four random edits of `base`, splicing from `other`.
fn mutate(base: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                v[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                v[at] = b"\0\x01\x7f\x80\xff 07\n="[rng.below(10)];
            }
            3 if len >= 8 => {
                let at = rng.below(len - 7);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let x = if rng.below(2) == 0 {
                    x
                } else {
                    x.wrapping_sub(1)
                };
                v[at..at + 8].copy_from_slice(&x.to_le_bytes());
            }
            4 => v.truncate(rng.below(len + 1)),
            5 if !other.is_empty() => {
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(1024));
                let chunk = v[at..at + n].to_vec();
                let to = rng.below(len + 1);
                v.splice(to..to, chunk);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(1024));
                v.drain(at..at + n);
            }
            _ => {}
        }
    }
    v
}

fn run(name: &str, target: Target, seed: u64) {
    let start = Instant::now();
    let seeds = inputs(name);
    let mut rng = Rng::new(seed);
    let mut cases = 0;
    for (i, (path, bytes)) in seeds.iter().enumerate() {
        if let Err(e) = target(bytes) {
            panic!("{name} on {}: {e}", path.display());
        }
        cases += 1;
        let other = &seeds[(i + 1) % seeds.len()].1;
        for k in 0..MUTATIONS_PER_SEED {
            let case = mutate(bytes, other, &mut rng);
            if let Err(e) = target(&case) {
                let dump = std::env::temp_dir().join(format!("snapfs-{name}-crash-{i}-{k}"));
                let _ = std::fs::write(&dump, &case);
                panic!(
                    "{name}: mutation {k} of {} (saved as {}): {e}",
                    path.display(),
                    dump.display()
                );
            }
            cases += 1;
        }
    }
    println!(
        "fuzz {name}: {cases} cases from {} seeds in {:.1?}",
        seeds.len(),
        start.elapsed()
    );
}

#[test]
fn fuzz_corpus_tar_index() {
    run("tar_index", fuzzing::tar_index, 0x7a31);
}

#[test]
fn fuzz_corpus_checkpoint_reader() {
    run("checkpoint_reader", fuzzing::checkpoint_reader, 0xc4e2);
}

#[test]
fn fuzz_corpus_index_loader() {
    run("index_loader", fuzzing::index_loader, 0x1d3f);
}
