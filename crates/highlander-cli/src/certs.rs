//! `highlander secret`, `highlander certs init` and `highlander certs issue`.

use crate::args::{CliError, Command, Parsed, switch, value, values};
use highlander::NodeId;
use highlander::quic::{
    CertError, ClusterSecret, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_NODE_VALIDITY_DAYS, generate_ca,
    issue_node_cert, node_name,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Past this the certificate's end date overflows what X.509 and `time` can hold.
const MAX_DAYS: u32 = 36_500;

pub static SECRET: Command = Command {
    name: "secret",
    usage: "highlander secret [--out FILE] [--force]",
    help: "\
Prints a new random cluster secret (32 bytes from the system's generator, 43 characters of
URL-safe base64). Every node of a cluster gets the same secret, e.g. through
`tls.cluster_secret_file` in its node.toml; each derives the cluster CA from it.

Options:
  --out FILE   write it to FILE (mode 0600) instead of printing it
  --force      overwrite FILE if it exists",
    flags: &[value("--out"), switch("--force")],
};

pub static INIT: Command = Command {
    name: "certs init",
    usage: "highlander certs init --dir DIR [--days N] [--force]",
    help: "\
Makes a cluster CA: DIR/ca.pem (the CA certificate, give it to every node) and DIR/ca.key
(its private key, mode 0600; keep it off the nodes, it only signs node certificates).
DIR is created if needed.

Options:
  --dir DIR    where to write the CA
  --days N     validity in days (default 3650)
  --force      replace an existing CA (certificates it signed stop being trusted)",
    flags: &[value("--dir"), value("--days"), switch("--force")],
};

pub static ISSUE: Command = Command {
    name: "certs issue",
    usage: "highlander certs issue --dir DIR --node-id N [--addr ADDR]... [--days N] [--out OUTDIR] [--force]",
    help: "\
Issues a certificate for node N, signed by the CA in DIR (made by `highlander certs init`):
OUTDIR/node-N.pem and OUTDIR/node-N.key (mode 0600). The certificate names the node as
node-N.highlander.invalid, which is what peers check, plus each --addr for other tools.

Options:
  --dir DIR      the directory holding ca.pem and ca.key
  --node-id N    the node's id, as in the peer list
  --addr ADDR    an IP address, IP:PORT or DNS name the node is reached at; repeat it or
                 separate with commas
  --days N       validity in days (default 365)
  --out OUTDIR   where to write the files (default: DIR)
  --force        overwrite existing files",
    flags: &[
        value("--dir"),
        value("--node-id"),
        values("--addr"),
        value("--days"),
        value("--out"),
        switch("--force"),
    ],
};

pub fn secret(args: &Parsed) -> Result<(), CliError> {
    let secret = ClusterSecret::generate()
        .map_err(|e| CliError::failed(format!("cannot make a secret: {e}")))?;
    match args.get("--out") {
        None => {
            println!("{}", secret.expose());
        }
        Some(out) => {
            let out = PathBuf::from(out);
            let files = [(out.clone(), format!("{}\n", secret.expose()), 0o600)];
            write_files(&files, args.switch("--force"))?;
            println!("wrote a new cluster secret to {} (mode 0600)", out.display());
        }
    }
    Ok(())
}

pub fn init(args: &Parsed) -> Result<(), CliError> {
    let dir = PathBuf::from(args.required("--dir")?);
    let days = args.number("--days", 1, MAX_DAYS)?.unwrap_or(DEFAULT_CA_VALIDITY_DAYS);
    let force = args.switch("--force");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    // Refuse before making anything, so a refusal changes nothing.
    refuse_existing(&[&cert, &key], force, "its node certificates would no longer be trusted")?;
    let ca = generate_ca(days).map_err(|e| CliError::failed(format!("cannot make the CA: {e}")))?;
    create_dir(&dir)?;
    write_files(&[(cert.clone(), ca.cert_pem, 0o644), (key.clone(), ca.key_pem, 0o600)], force)?;
    println!("wrote {} (CA certificate, for every node)", cert.display());
    println!("wrote {} (CA private key, mode 0600: keep it off the nodes)", key.display());
    println!("valid for {days} days");
    println!(
        "next: highlander certs issue --dir {} --node-id 1 --addr <its address>",
        shell_word(&dir)
    );
    Ok(())
}

pub fn issue(args: &Parsed) -> Result<(), CliError> {
    let dir = PathBuf::from(args.required("--dir")?);
    let node = NodeId(
        args.number("--node-id", 0, u64::MAX)?
            .ok_or_else(|| args.error("--node-id is required"))?,
    );
    let days = args.number("--days", 1, MAX_DAYS)?.unwrap_or(DEFAULT_NODE_VALIDITY_DAYS);
    let out = args.get("--out").map(PathBuf::from).unwrap_or_else(|| dir.clone());
    let force = args.switch("--force");
    let addresses: Vec<String> = args
        .all("--addr")
        .iter()
        .flat_map(|a| a.split(','))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();

    let (cert_path, key_path) =
        (out.join(format!("node-{}.pem", node.0)), out.join(format!("node-{}.key", node.0)));
    refuse_existing(&[&cert_path, &key_path], force, "the node may be using them")?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            CliError::failed(format!(
                "cannot read {}: {e} (make a CA first: highlander certs init --dir {})",
                path.display(),
                shell_word(&dir)
            ))
        })
    };
    let (ca_cert, ca_key) = (read("ca.pem")?, read("ca.key")?);
    let issued =
        issue_node_cert(&ca_cert, &ca_key, node, &addresses, days).map_err(|e| match e {
            CertError::BadAddress(_) | CertError::ReservedName(_) => {
                args.error(format!("--addr: {}", e.to_string().trim_start_matches("addresses: ")))
            }
            CertError::BadCaCert(_) | CertError::BadCaKey(_) | CertError::Mismatch(_) => {
                CliError::failed(format!("the CA in {} cannot be used: {e}", dir.display()))
            }
            other => CliError::failed(format!("cannot issue the certificate: {other}")),
        })?;
    create_dir(&out)?;
    write_files(
        &[(cert_path.clone(), issued.cert_pem, 0o644), (key_path.clone(), issued.key_pem, 0o600)],
        force,
    )?;
    println!("wrote {} (certificate of node {})", cert_path.display(), node.0);
    println!("wrote {} (its private key, mode 0600)", key_path.display());
    println!("  identity   {}", node_name(node));
    if !addresses.is_empty() {
        println!("  addresses  {}", addresses.join(", "));
    }
    println!("  valid for  {days} days");
    println!("for node {}'s node.toml:", node.0);
    println!("  [tls]");
    // Absolute: node.toml resolves relative paths against its own directory, not ours.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    println!("  ca_cert = {:?}", absolute(&dir.join("ca.pem")).display().to_string());
    println!("  node_cert = {:?}", absolute(&cert_path).display().to_string());
    println!("  node_key = {:?}", absolute(&key_path).display().to_string());
    Ok(())
}

fn refuse_existing(paths: &[&Path], force: bool, why: &str) -> Result<(), CliError> {
    if force {
        return Ok(());
    }
    let existing: Vec<String> =
        paths.iter().filter(|p| p.exists()).map(|p| p.display().to_string()).collect();
    if existing.is_empty() {
        return Ok(());
    }
    Err(CliError::failed(format!(
        "refusing to overwrite {} ({why}); pass --force to replace {}",
        existing.join(" and "),
        if existing.len() == 1 { "it" } else { "them" }
    )))
}

fn create_dir(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(format!("cannot create {}: {e}", dir.display())))
}

/// Writes each file with its mode. Without `force` a file that appeared meanwhile is not
/// overwritten (`create_new`); with it, a temporary is renamed over the old file, so a key
/// file never exists with a looser mode, not even for a moment.
fn write_files(files: &[(PathBuf, String, u32)], force: bool) -> Result<(), CliError> {
    for (path, contents, mode) in files {
        let fail =
            |e: std::io::Error| CliError::failed(format!("cannot write {}: {e}", path.display()));
        if force {
            let mut tmp = path.clone().into_os_string();
            tmp.push(format!(".tmp-{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            let written =
                write_new(&tmp, contents, *mode).and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(fail(e));
            }
        } else {
            write_new(path, contents, *mode).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    CliError::failed(format!(
                        "refusing to overwrite {}; pass --force to replace it",
                        path.display()
                    ))
                } else {
                    fail(e)
                }
            })?;
        }
    }
    Ok(())
}

fn write_new(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// A path as the user would type it in a shell (quoted when it needs to be).
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c)) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}
