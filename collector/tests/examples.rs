//! The declarations in `examples/declarations` are what new users copy: they must stay valid.

use std::path::{Path, PathBuf};

use collector::declarations::{Objects, parse_file, validate};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn example_declarations_parse_and_validate_together() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/declarations");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    assert!(files.len() >= 5, "examples present: {files:?}");
    let (mut parsed, mut problems) = (Vec::new(), Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        parse_file(&file.display().to_string(), &text, &mut parsed, &mut problems);
    }
    problems.extend(validate(&Objects::default(), &parsed));
    assert!(problems.is_empty(), "example declarations have problems: {problems:#?}");
    let kinds: Vec<String> = parsed.iter().map(|p| format!("{:?}", p.declaration.kind())).collect();
    for kind in ["Watch", "Team", "Workload", "ApprovedChange", "Detections"] {
        assert!(kinds.iter().any(|k| k == kind), "an example of {kind}: {kinds:?}");
    }
}
