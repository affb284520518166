//! Builds the protobuf descriptor set that `skiff-proto` embeds.
//!
//! Sources: the `.proto` files shipped inside the `envoy-types` crate (its package directory,
//! found from Cargo.lock + Cargo's registry, or `cargo metadata`) plus skiff's own files under `proto/third_party/` (public schemas that
//! envoy-types lacks). Every root file is compiled on its own, with only its imports loaded,
//! and the results are merged by file name. Compiling everything in one compiler makes
//! relative type names such as `config.core.v3.Metadata` resolve into unrelated sibling
//! packages that only exist because every file was loaded (see shared XDS-RECIPE.md).
//!
//! The output is `$OUT_DIR/skiff_descriptors.bin`, an encoded `FileDescriptorSet` in
//! dependency order, without source info.
//!
//! Set `SKIFF_ENVOY_TYPES_PROTO_DIR` to the crate's `proto/` directory to skip `cargo metadata`.
//! Because only this script and `third_party/` are watched, bumping envoy-types needs a
//! `touch proto/build.rs` to regenerate the set.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use protox::file::{
    ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
};

type BoxError = Box<dyn Error>;

/// Sub-directories of envoy-types' `proto/` that go on the include path.
const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

/// Directories (relative to envoy-types' `proto/`) whose files are all compiled as roots,
/// with the include directory their names are relative to.
const ROOTS: &[(&str, &str)] = &[("data-plane-api", "envoy"), ("xds", "udpa"), ("xds", "xds")];

fn main() {
    if let Err(err) = run() {
        // A build script reports failure by panicking; the message is what the user sees.
        panic!("skiff-proto build script failed: {err}");
    }
}

fn run() -> Result<(), BoxError> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let own_dir = manifest_dir.join("third_party");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", own_dir.display());
    println!("cargo:rerun-if-env-changed=SKIFF_ENVOY_TYPES_PROTO_DIR");

    let envoy_dir = envoy_types_proto_dir(&manifest_dir)?;

    let mut includes: Vec<PathBuf> = INCLUDES.iter().map(|d| envoy_dir.join(d)).collect();
    // skiff's own files come last: they only fill gaps and never shadow envoy-types' files.
    includes.push(own_dir.clone());

    let mut roots = Vec::new();
    for (include, sub) in ROOTS {
        collect_protos(&envoy_dir.join(include), Path::new(sub), &mut roots)?;
    }
    collect_protos(&own_dir, Path::new(""), &mut roots)?;
    roots.sort();
    roots.dedup();

    const KNOWN_UNRESOLVABLE: &str =
        "envoy/extensions/clusters/dynamic_forward_proxy/v3/cluster.proto";
    let resolver = CachingResolver::new(&includes);
    let mut own: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut imported: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut failed = 0usize;
    for root in &roots {
        let mut compiler = protox::Compiler::with_file_resolver(resolver.clone());
        compiler.include_imports(true).include_source_info(false);
        if let Err(err) = compiler.open_file(root) {
            // protox resolves a relative name in this one file into the wrong package; skiff
            // never needs the type, so skipping it is expected and not worth a warning.
            if root != KNOWN_UNRESOLVABLE {
                failed += 1;
                println!("cargo:warning=skiff-proto: skipped {root}: {err}");
            }
            continue;
        }
        for file in compiler.file_descriptor_set().file {
            let name = file.name().to_owned();
            if name == *root {
                own.insert(name, file);
            } else {
                imported.entry(name).or_insert(file);
            }
        }
    }
    // A file compiled as its own root wins over copies compiled as someone's import.
    for (name, file) in imported {
        own.entry(name).or_insert(file);
    }

    let set = FileDescriptorSet {
        file: topological(own)?,
    };
    let out = PathBuf::from(env::var("OUT_DIR")?).join("skiff_descriptors.bin");
    fs::write(&out, set.encode_to_vec())?;
    if failed > 0 {
        println!(
            "cargo:warning=skiff-proto: {failed} of {} root files skipped; {} files in the set",
            roots.len(),
            set.file.len()
        );
    }
    Ok(())
}

/// Finds envoy-types' `proto/` directory: the env override, else the version pinned in the
/// workspace's Cargo.lock looked up in Cargo's registry sources, else `cargo metadata`.
fn envoy_types_proto_dir(manifest_dir: &Path) -> Result<PathBuf, BoxError> {
    if let Some(dir) = env::var_os("SKIFF_ENVOY_TYPES_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = from_lockfile(manifest_dir) {
        return Ok(dir);
    }
    from_cargo_metadata(manifest_dir)
}

/// The envoy-types version in the nearest Cargo.lock, found under `$CARGO_HOME/registry/src`.
/// Cheap, and unaffected by half-edited manifests elsewhere in the workspace (which make
/// `cargo metadata --offline` fail to resolve).
fn from_lockfile(manifest_dir: &Path) -> Option<PathBuf> {
    let lock = manifest_dir
        .ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file())?;
    let text = fs::read_to_string(lock).ok()?;
    let mut versions = text.split("[[package]]").filter_map(|pkg| {
        let mut lines = pkg.lines().map(str::trim);
        lines.find(|l| *l == "name = \"envoy-types\"")?;
        let version = lines.find_map(|l| l.strip_prefix("version = \""))?;
        Some(version.trim_end_matches('"').to_owned())
    });
    let version = versions.next()?;
    if versions.next().is_some() {
        return None; // several versions: let cargo metadata pick skiff-proto's
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let registries = fs::read_dir(cargo_home.join("registry").join("src")).ok()?;
    registries
        .filter_map(Result::ok)
        .map(|r| {
            r.path()
                .join(format!("envoy-types-{version}"))
                .join("proto")
        })
        .find(|dir| dir.join("data-plane-api").is_dir())
}

/// Asks `cargo metadata` for the envoy-types package that skiff-proto depends on.
fn from_cargo_metadata(manifest_dir: &Path) -> Result<PathBuf, BoxError> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(manifest_dir.join("Cargo.toml"))
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed (set SKIFF_ENVOY_TYPES_PROTO_DIR to envoy-types' proto/ dir): {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata: no packages array")?;
    // With several envoy-types versions in the graph, take the one skiff-proto depends on.
    let wanted = metadata["resolve"]["nodes"]
        .as_array()
        .and_then(|nodes| {
            nodes.iter().find(|n| {
                n["id"]
                    .as_str()
                    .is_some_and(|id| id.contains("skiff-proto"))
            })
        })
        .and_then(|node| node["dependencies"].as_array())
        .and_then(|deps| {
            deps.iter()
                .filter_map(|d| d.as_str())
                .find(|d| d.contains("envoy-types"))
                .map(str::to_owned)
        });
    let package = packages
        .iter()
        .filter(|p| p["name"] == "envoy-types")
        .find(|p| match &wanted {
            Some(id) => p["id"].as_str() == Some(id.as_str()),
            None => true,
        })
        .ok_or("cargo metadata: envoy-types is not in the dependency graph")?;
    let manifest = package["manifest_path"]
        .as_str()
        .ok_or("cargo metadata: envoy-types has no manifest_path")?;
    let dir = Path::new(manifest)
        .parent()
        .ok_or("envoy-types manifest has no parent directory")?
        .join("proto");
    if !dir.join("data-plane-api").is_dir() {
        return Err(format!("{} has no data-plane-api/ directory", dir.display()).into());
    }
    Ok(dir)
}

/// Appends the names (relative to `include`) of all `.proto` files under `include/sub`.
fn collect_protos(include: &Path, sub: &Path, out: &mut Vec<String>) -> Result<(), BoxError> {
    let dir = include.join(sub);
    if !dir.is_dir() {
        return Ok(());
    }
    let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = sub.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            collect_protos(include, &rel, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            let name = rel
                .to_str()
                .ok_or_else(|| format!("non-UTF-8 path {}", path.display()))?
                .replace('\\', "/");
            out.push(name);
        }
    }
    Ok(())
}

/// Orders files so that each comes after the files it imports.
fn topological(
    files: BTreeMap<String, FileDescriptorProto>,
) -> Result<Vec<FileDescriptorProto>, BoxError> {
    fn visit(
        name: &str,
        files: &BTreeMap<String, FileDescriptorProto>,
        done: &mut HashSet<String>,
        out: &mut Vec<FileDescriptorProto>,
    ) -> Result<(), BoxError> {
        if !done.insert(name.to_owned()) {
            return Ok(());
        }
        let file = files
            .get(name)
            .ok_or_else(|| format!("import {name} missing from the merged set"))?;
        for dep in &file.dependency {
            visit(dep, files, done, out)?;
        }
        out.push(file.clone());
        Ok(())
    }
    let mut done = HashSet::new();
    let mut out = Vec::with_capacity(files.len());
    for name in files.keys() {
        visit(name, &files, &mut done, &mut out)?;
    }
    Ok(out)
}

/// A resolver that parses each file once and hands out copies without source info: each of
/// the ~500 per-root compilations re-checks its imports but never re-parses them.
#[derive(Clone)]
struct CachingResolver {
    inner: Rc<ChainFileResolver>,
    cache: Rc<RefCell<HashMap<String, File>>>,
}

impl CachingResolver {
    fn new(includes: &[PathBuf]) -> Self {
        let mut chain = ChainFileResolver::new();
        for include in includes {
            chain.add(IncludeFileResolver::new(include.clone()));
        }
        chain.add(GoogleFileResolver::new());
        CachingResolver {
            inner: Rc::new(chain),
            cache: Rc::new(RefCell::new(HashMap::new())),
        }
    }
}

impl FileResolver for CachingResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if let Some(file) = self.cache.borrow().get(name) {
            return Ok(file.clone());
        }
        let file = self.inner.open_file(name)?;
        let mut descriptor = file.file_descriptor_proto().clone();
        descriptor.source_code_info = None;
        let file = File::from_file_descriptor_proto(descriptor);
        self.cache
            .borrow_mut()
            .insert(name.to_owned(), file.clone());
        Ok(file)
    }
}
