//! `fhirmesh`: one binary for every fhirmesh service.
//!
//! `fhirmesh serve` runs the whole server in one process on embedded parts; `fhirmesh serve
//! --target <service>` runs one service of the mesh. This file only parses the command line;
//! `serve.rs` composes services from configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fhirmesh::{Config, Overrides, Target, serve};

/// mimalloc instead of the system allocator: a request allocates many small, short-lived objects
/// (JSON values, SQL rows) across threads, where glibc malloc spent ~14 % of search CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A FHIR R4 server: embedded on a laptop, or as a mesh of services.
#[derive(Debug, Parser)]
#[command(name = "fhirmesh", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file (layered over the defaults, under FHIRMESH_* variables and flags).
    #[arg(long, global = true, env = "FHIRMESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (all services in one process by default).
    Serve(ServeArgs),
    /// Print the effective configuration (defaults, file, environment, flags) as JSON and exit.
    Config(ServeArgs),
    /// Rebuild the search index from the store's change log (e.g. after a search-parameter change
    /// or a lost index); a running server keeps serving meanwhile.
    Reindex(ReindexArgs),
    /// Create what the configured backends need, idempotently: the DynamoDB table (with its
    /// stream and indexes), NATS streams or the SNS topic with SQS queues and dead-letter queues,
    /// the S3 bucket. Safe to run on every deploy.
    Provision(ServeArgs),
    /// Measure a FHIR server (this one or any other): named scenarios, bounded in time and
    /// requests, throughput and latency percentiles, against a bare-hyper baseline.
    Bench(fhirmesh::tools::BenchArgs),
    /// Load data into a FHIR server: seeded synthetic patients, transaction Bundles, NDJSON.
    Load(fhirmesh::tools::LoadArgs),
    /// Bulk Data export from a FHIR server (this one or any other): kick-off, progress, and every
    /// NDJSON file downloaded with the manifest.
    Export(fhirmesh::tools::ExportArgs),
    /// Implementation Guide packages (FHIR NPM .tgz) the server loads at start [config: ig.dir;
    /// default {storage.data_dir}/ig].
    Ig(IgArgs),
}

#[derive(Debug, clap::Args)]
struct IgArgs {
    /// Directory for the embedded database, under which packages are kept by default
    /// [config: storage.data_dir; default ./data].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: IgCommand,
}

#[derive(Debug, Subcommand)]
enum IgCommand {
    /// Install packages (.tgz files), replacing installed versions of the same packages; checked
    /// first: valid packages, R4, dependencies installed, no conflicting canonical URLs.
    Install {
        #[arg(required = true, value_name = "PACKAGE.tgz")]
        files: Vec<PathBuf>,
    },
    /// List the installed packages.
    List,
    /// Remove packages (`name` or `name#version`) that no other installed package needs.
    Remove {
        #[arg(required = true, value_name = "NAME")]
        packages: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct ReindexArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// On OpenSearch, how long the previous index generation outlives the switch (searches and
    /// points in time already on it finish first), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    retire_after: u64,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Service to run.
    #[arg(long, value_enum, default_value = "all")]
    target: Target,
    /// HTTP listen address of the FHIR API [config: server.listen; default 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Directory for the embedded database [config: storage.data_dir; default ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Path prefix of the FHIR base, e.g. /fhir [config: server.base_path; default: server root].
    #[arg(long, value_name = "PATH")]
    base_path: Option<String>,
    /// Absolute URL clients reach the API at, for links [config: server.public_base_url].
    #[arg(long, value_name = "URL")]
    public_base_url: Option<String>,
    /// Largest request body in bytes [config: server.max_body_bytes; default 16 MiB].
    #[arg(long, value_name = "BYTES")]
    max_body_bytes: Option<usize>,
    /// fsync each commit; false trades durability for speed [config: storage.durable; default true].
    #[arg(long, value_name = "BOOL")]
    durable: Option<bool>,
    /// gRPC listen address of the resource service [config: resource.grpc_listen; default 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<String>,
    /// gRPC endpoint the gateway calls [config: gateway.resource_endpoint; default http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    resource_endpoint: Option<String>,
    /// Allow PUT to create unknown ids [config: resource.update_create; default true].
    #[arg(long, value_name = "BOOL")]
    update_create: Option<bool>,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        let set =
            |section: &mut serde_json::Map<String, serde_json::Value>, key: &str, value: Option<serde_json::Value>| {
                if let Some(value) = value {
                    section.insert(key.to_owned(), value);
                }
            };
        set(&mut o.server, "listen", self.listen.clone().map(Into::into));
        set(&mut o.server, "base_path", self.base_path.clone().map(Into::into));
        set(&mut o.server, "public_base_url", self.public_base_url.clone().map(Into::into));
        set(&mut o.server, "max_body_bytes", self.max_body_bytes.map(Into::into));
        set(&mut o.storage, "data_dir", self.data_dir.as_ref().map(|d| d.display().to_string().into()));
        set(&mut o.storage, "durable", self.durable.map(Into::into));
        set(&mut o.resource, "grpc_listen", self.grpc_listen.clone().map(Into::into));
        set(&mut o.resource, "update_create", self.update_create.map(Into::into));
        set(&mut o.gateway, "resource_endpoint", self.resource_endpoint.clone().map(Into::into));
        o
    }
}

enum Action {
    Serve,
    PrintConfig,
    Reindex { retire_after: std::time::Duration },
    Provision,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (args, action) = match &cli.command {
        Command::Serve(args) => (args, Action::Serve),
        Command::Config(args) => (args, Action::PrintConfig),
        Command::Reindex(args) => {
            (&args.serve, Action::Reindex { retire_after: std::time::Duration::from_secs(args.retire_after) })
        }
        Command::Provision(args) => (args, Action::Provision),
        Command::Bench(args) => return exit(fhirmesh::tools::run_bench(args)),
        Command::Load(args) => return exit(fhirmesh::tools::run_load(args)),
        Command::Export(args) => return exit(fhirmesh::tools::run_export(args)),
        Command::Ig(args) => return exit(run_ig(cli.config.as_deref(), args)),
    };
    let config = match Config::load(cli.config.as_deref(), Config::env(), &args.overrides()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("fhirmesh: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let outcome = match action {
        Action::PrintConfig => {
            println!("{}", serde_json::to_string_pretty(&config).unwrap_or_default());
            return std::process::ExitCode::SUCCESS;
        }
        Action::Reindex { retire_after } => fhirmesh::reindex::run(&config, retire_after),
        Action::Provision => fhirmesh::provision::run(&config),
        Action::Serve => serve::run(config, args.target),
    };
    exit(outcome)
}

fn run_ig(file: Option<&std::path::Path>, args: &IgArgs) -> anyhow::Result<()> {
    let mut overrides = Overrides::default();
    if let Some(dir) = &args.data_dir {
        overrides.storage.insert("data_dir".to_owned(), dir.display().to_string().into());
    }
    let config = Config::load(file, Config::env(), &overrides)?;
    match &args.command {
        IgCommand::Install { files } => fhirmesh::ig::install(&config, files),
        IgCommand::List => fhirmesh::ig::list(&config),
        IgCommand::Remove { packages } => fhirmesh::ig::remove(&config, packages),
    }
}

fn exit(outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fhirmesh: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
