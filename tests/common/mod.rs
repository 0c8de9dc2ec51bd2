//! Helpers shared by the tests that run the examples.

#![allow(dead_code)]

pub mod operator;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command};

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

/// Reads the child's stdout until a line starting with each prefix has been seen; returns
/// the rest of each such line, in the order of `prefixes`.
pub fn lines_with(child: &mut Child, prefixes: &[&str]) -> Vec<String> {
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
    for line in lines.by_ref() {
        let line = line.expect("line");
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(rest) = line.strip_prefix(p) {
                found[i] = Some(rest.to_string());
            }
        }
        if found.iter().all(Option::is_some) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return found.into_iter().flatten().collect();
        }
    }
    panic!("child exited before printing {prefixes:?}");
}
