//! Single-core inflate speed of zlib-rs (the inflate snapfs uses) on a gzip file:
//! prints output MB/s of the best of `REPS` full decodes. `scripts/inflate-bench.sh`
//! puts it beside zlib, zlib-ng and ISA-L on the same file.
//!
//!     cargo run --release --example inflate -- FILE.gz [REPS]

use std::io::Read;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: inflate FILE.gz [REPS]")?;
    let reps: usize = args.next().map_or(Ok(3), |r| r.parse())?;
    let gz = std::fs::read(&path)?;
    let mut best = f64::MAX;
    let mut out_len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..reps {
        let t0 = Instant::now();
        let mut dec = flate2::read::MultiGzDecoder::new(&gz[..]);
        out_len = 0;
        loop {
            let n = dec.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out_len += n as u64;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!("zlib-rs\t{:.1}", out_len as f64 / 1e6 / best);
    Ok(())
}
