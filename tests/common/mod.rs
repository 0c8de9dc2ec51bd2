//! Helpers shared by the tests that run the examples.

use std::path::Path;
use std::process::Command;

/// The example `name`, as `cargo test` builds it (next to the test binaries' `deps` folder).
pub fn example(name: &str) -> Command {
    let exe = std::env::current_exe().expect("test exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run through `cargo test`, which builds examples",
        path.display()
    );
    Command::new(path)
}
