//! `cri-pull SOCKET IMAGE`: pulls IMAGE through containerd's CRI plugin at SOCKET
//! (scripts/bench-containerd.sh's pull rows; the client is tests/cri.rs).

#[path = "../tests/cri.rs"]
mod cri;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: cri-pull SOCKET IMAGE");
        std::process::exit(2);
    }
    match cri::pull(std::path::Path::new(&args[1]), &args[2]) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("cri-pull {}: {e}", args[2]);
            std::process::exit(1);
        }
    }
}
