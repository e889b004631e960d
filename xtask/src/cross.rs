//! `cargo xtask cross aarch64|armv7`: builds the worker-only binary (`legion-worker`,
//! no compiler passes) for a board, release profile, with the linker and runner that
//! .cargo/config.toml names.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A board architecture the worker is built for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Arch {
    /// aarch64-unknown-linux-gnu (Firefly-RK3399).
    Aarch64,
    /// armv7-unknown-linux-gnueabihf (Odroid-XU4).
    Armv7,
}

impl Arch {
    /// Every architecture, in a stable order.
    pub const ALL: [Arch; 2] = [Arch::Aarch64, Arch::Armv7];

    /// The Rust target triple.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
            Arch::Armv7 => "armv7-unknown-linux-gnueabihf",
        }
    }

    /// The cross linker (Debian package in parentheses of the error).
    fn linker(self) -> (&'static str, &'static str) {
        match self {
            Arch::Aarch64 => ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            Arch::Armv7 => ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
        }
    }

    /// The qemu-user binary that runs it, and the sysroot it needs.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Arch::Aarch64 => ("qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
            Arch::Armv7 => ("qemu-arm-static", "/usr/arm-linux-gnueabihf"),
        }
    }

    /// The board class it stands for.
    pub fn board(self) -> &'static str {
        match self {
            Arch::Aarch64 => "firefly-rk3399",
            Arch::Armv7 => "odroid-xu4",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The board architecture.
    #[arg(value_enum)]
    arch: Arch,
}

/// The workspace's target directory (`$CARGO_TARGET_DIR` when set).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| legion_models::workspace_root().join("target"))
}

/// The worker binary for `arch` built into `target_dir`.
pub fn binary(arch: Arch, target_dir: &Path) -> PathBuf {
    target_dir
        .join(arch.triple())
        .join("release")
        .join("legion-worker")
}

/// Checks that the Rust target and the cross linker are installed.
fn check_tools(arch: Arch) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running `rustup target list --installed`")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    if !installed.lines().any(|l| l.trim() == arch.triple()) {
        bail!(
            "the Rust target {} is not installed: run `rustup target add {}`",
            arch.triple(),
            arch.triple()
        );
    }
    let (linker, package) = arch.linker();
    if Command::new(linker).arg("--version").output().is_err() {
        bail!("the cross linker {linker} is missing: run `apt-get install {package}`");
    }
    Ok(())
}

/// Builds the worker for `arch` into `target_dir`; returns how long the build took.
pub fn build(arch: Arch, target_dir: &Path) -> Result<Duration> {
    check_tools(arch)?;
    eprintln!("building legion-worker for {}", arch.triple());
    let start = Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(legion_models::workspace_root())
        .args(["build", "--release", "--package", "legion-runtime"])
        .args(["--bin", "legion-worker", "--target", arch.triple()])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build for {} failed ({status})", arch.triple());
    }
    Ok(start.elapsed())
}

pub fn run(args: &Args) -> Result<()> {
    let took = build(args.arch, &target_dir())?;
    let bin = binary(args.arch, &target_dir());
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{} was not built", bin.display()))?
        .len();
    let (qemu, sysroot) = args.arch.qemu();
    println!(
        "{} ({:.1} MiB, built in {:.0} s)\nrun it here with: {qemu} -L {sysroot} {} --emulate {}",
        bin.display(),
        size as f64 / (1 << 20) as f64,
        took.as_secs_f64(),
        bin.display(),
        args.arch.board()
    );
    Ok(())
}
