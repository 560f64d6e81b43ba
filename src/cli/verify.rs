//! `snapfs verify <image>`: reads every layer blob of the chosen image once and checks
//! it against the manifest (digest, size) and the config (`diff_ids`); prints one line
//! per layer, or fails with one line naming the layer. Also the check `mount --verify`
//! runs before a mount goes live.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::archive::Progress;
use crate::error::{Error, Result};
use crate::image::verify::{self, LayerCheck};
use crate::image::Image;

/// Arguments of `snapfs verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The image: an OCI layout directory, an OCI archive or a docker save archive.
    image: PathBuf,
    #[command(flatten)]
    select: super::ImageArgs,
}

/// Verifies `img` with a progress bar on a terminal.
pub fn check(img: &Image) -> Result<Vec<LayerCheck>> {
    let progress = Progress::default();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(verify::total_bytes(img));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(img.display_name());
        bar
    });
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| verify::verify(img, &progress));
        if let Some(bar) = &bar {
            while !worker.is_finished() {
                bar.set_position(progress.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        worker.join()
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result.unwrap_or_else(|_| Err(Error::Internal("verify thread panicked".into())))
}

/// Runs `snapfs verify`.
pub fn run(args: VerifyArgs) -> Result<ExitCode> {
    super::check_input(&args.image)?;
    let Some(img) = Image::open(&args.image, &args.select.select()?)? else {
        return Err(Error::NotA {
            path: args.image.clone(),
            expected: "container image",
            detail: Some("an archive; snapfs index checks archives".into()),
        });
    };
    let start = Instant::now();
    let checks = check(&img)?;
    let n = checks.len();
    for (i, c) in checks.iter().enumerate() {
        println!(
            "ok layer {}/{n} {}: {} {} bytes, {} bytes uncompressed, diff_id {}",
            i + 1,
            c.label,
            c.compression.name(),
            c.size,
            c.uncompressed,
            c.diff_id
        );
    }
    let shown =
        |d: &Option<crate::image::Digest>| d.as_ref().map_or("-".to_string(), |d| d.to_string());
    println!(
        "verified {}: {n} layers, manifest {}, config {} in {:.3} s",
        img.display_name(),
        shown(&img.manifest.as_ref().and_then(|m| m.digest.clone())),
        shown(&img.config_blob.digest),
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
