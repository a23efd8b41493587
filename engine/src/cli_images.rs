//! The `spendflow images` commands and the Personnel flags of `spendflow run`, kept apart from
//! `cli.rs` so that file stays about the engine. Logic lives in the library
//! (`spendflow_engine::personnel`); this only parses, connects and prints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use spendflow_engine::images::{DEFAULT_MAX_BYTES, GcOptions};
use spendflow_engine::personnel::{Personnel, PersonnelConfig, PersonnelError};

/// `spendflow images`: personnel pictures on HDFS, referenced from the MySQL users table.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    #[command(subcommand)]
    command: ImagesCommand,
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Upload FILE as the picture of USER_ID (replacing any picture the user has).
    ///
    /// The bytes decide the type: PNG, JPEG or WebP only, whatever the file is called; at most
    /// --max-image-bytes (5 MiB). The user must exist in MySQL. Exits non-zero with the reason
    /// if the upload is refused; nothing is stored then.
    ///
    /// Example:
    ///   spendflow images put 42 face.png --mysql mysql://spendflow:spendflow@127.0.0.1:13306/spendflow \
    ///       --hdfs hdfs://127.0.0.1:9000
    #[command(verbatim_doc_comment)]
    Put {
        /// The user (must exist in the users table).
        user_id: u64,
        /// The image file.
        file: PathBuf,
        /// Declared type (image/png, image/jpeg, image/webp); must match the bytes. Default:
        /// the bytes decide.
        #[arg(long, value_name = "MIME")]
        content_type: Option<String>,
        #[command(flatten)]
        services: ServiceArgs,
    },
    /// Write the picture of USER_ID to OUT (checked against its SHA-256).
    ///
    /// Example:
    ///   spendflow images get 42 /tmp/face.png --mysql ... --hdfs hdfs://127.0.0.1:9000
    #[command(verbatim_doc_comment)]
    Get {
        /// The user.
        user_id: u64,
        /// Where to write it (replaced atomically).
        out: PathBuf,
        #[command(flatten)]
        services: ServiceArgs,
    },
    /// Remove the picture of USER_ID (the blob goes at the next `images gc` if no other user
    /// has the same picture).
    Delete {
        /// The user.
        user_id: u64,
        #[command(flatten)]
        services: ServiceArgs,
    },
    /// Remove blobs no user references and temporary files left by interrupted uploads.
    ///
    /// Orphaned blobs younger than --grace-minutes and temporary files younger than
    /// --tmp-age-minutes are kept (an upload may be using them).
    ///
    /// Example:
    ///   spendflow images gc --mysql ... --hdfs hdfs://127.0.0.1:9000 --dry-run
    #[command(verbatim_doc_comment)]
    Gc {
        /// Keep orphaned blobs modified less than this many minutes ago.
        #[arg(long, default_value_t = 10)]
        grace_minutes: u64,
        /// Keep temporary upload files modified less than this many minutes ago.
        #[arg(long, default_value_t = 60)]
        tmp_age_minutes: u64,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        services: ServiceArgs,
    },
}

/// Where the users and images are.
#[derive(Debug, Args)]
struct ServiceArgs {
    /// MySQL URL of the database `spendflow generate` wrote (users, cards).
    #[arg(long, value_name = "URL", env = "SPENDFLOW_MYSQL")]
    mysql: String,

    /// HDFS URL for the images, hdfs://host:port[/root] (root default /spendflow/images).
    #[arg(long, value_name = "URL", env = "SPENDFLOW_HDFS")]
    hdfs: String,

    /// Largest image accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    max_image_bytes: u64,
}

impl ServiceArgs {
    fn connect(&self) -> Result<Personnel> {
        let config = PersonnelConfig {
            mysql: self.mysql.clone(),
            hdfs: self.hdfs.clone(),
            max_image_bytes: self.max_image_bytes,
        };
        Personnel::connect(&config).context("could not open the user directory and image store")
    }
}

/// The Personnel flags of `spendflow run` (the `[personnel]` table of its config file).
#[derive(Debug, Args)]
pub struct PersonnelArgs {
    /// With --hdfs: serve user details and pictures (`spendflow.v1.Personnel`) from this MySQL
    /// database (the one `spendflow generate` wrote).
    #[arg(long, value_name = "URL")]
    mysql: Option<String>,

    /// With --mysql: HDFS URL for the pictures, hdfs://host:port[/root] (root default
    /// /spendflow/images).
    #[arg(long, value_name = "URL")]
    hdfs: Option<String>,

    /// Largest picture accepted by UploadImage, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    max_image_bytes: u64,
}

impl PersonnelArgs {
    /// The Personnel settings: `from_file`'s with the flags given (`given` says which) over
    /// them, or the flags' alone; `None` without --mysql and --hdfs.
    pub fn settings(
        &self,
        from_file: Option<PersonnelConfig>,
        given: impl Fn(&str) -> bool,
    ) -> Result<Option<PersonnelConfig>> {
        let mut config = match (from_file, &self.mysql, &self.hdfs) {
            (Some(config), _, _) => config,
            (None, Some(mysql), Some(hdfs)) => PersonnelConfig::new(mysql, hdfs),
            (None, None, None) => return Ok(None),
            (None, Some(_), None) => bail!("--mysql needs --hdfs URL (Personnel needs both)"),
            (None, None, Some(_)) => bail!("--hdfs needs --mysql URL (Personnel needs both)"),
        };
        if let Some(mysql) = &self.mysql {
            config.mysql.clone_from(mysql);
        }
        if let Some(hdfs) = &self.hdfs {
            config.hdfs.clone_from(hdfs);
        }
        if given("max_image_bytes") {
            config.max_image_bytes = self.max_image_bytes;
        }
        Ok(Some(config))
    }
}

/// Connects Personnel for `spendflow run`.
pub fn connect_personnel(config: &PersonnelConfig) -> Result<Arc<Personnel>> {
    let personnel = Personnel::connect(config)
        .context("could not open the user directory and image store (--mysql, --hdfs)")?;
    Ok(Arc::new(personnel))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the async runtime")
}

fn refused(e: PersonnelError) -> anyhow::Error {
    let what = match &e {
        PersonnelError::NotFound(_) => "not found",
        PersonnelError::Invalid { .. } | PersonnelError::TooLarge { .. } => "refused",
        PersonnelError::Unavailable {
            retriable: true, ..
        } => "failed (retry later)",
        _ => "failed",
    };
    anyhow::Error::new(e).context(what)
}

/// Runs `spendflow images ...`.
pub fn images_command(args: ImagesArgs) -> Result<()> {
    match args.command {
        ImagesCommand::Put {
            user_id,
            file,
            content_type,
            services,
        } => {
            let personnel = services.connect()?;
            let image = runtime()?
                .block_on(personnel.upload_file(
                    user_id,
                    content_type.as_deref().unwrap_or(""),
                    &file,
                ))
                .map_err(refused)
                .with_context(|| format!("upload of {} for user {user_id}", file.display()))?;
            println!(
                "user {user_id}: stored {} ({} bytes), sha256 {} in {}",
                image.content_type,
                image.size,
                image.sha256,
                personnel.image_location()
            );
        }
        ImagesCommand::Get {
            user_id,
            out,
            services,
        } => {
            let personnel = services.connect()?;
            let image = runtime()?
                .block_on(personnel.download_to_file(user_id, &out))
                .map_err(refused)
                .with_context(|| format!("image of user {user_id}"))?;
            println!(
                "user {user_id}: wrote {} ({} bytes, sha256 {}) to {}",
                image.content_type,
                image.size,
                image.sha256,
                out.display()
            );
        }
        ImagesCommand::Delete { user_id, services } => {
            let personnel = services.connect()?;
            let removed = runtime()?
                .block_on(personnel.delete_image(user_id))
                .map_err(refused)
                .with_context(|| format!("delete the image of user {user_id}"))?;
            match removed {
                Some(image) => println!(
                    "user {user_id}: image {} removed (its blob goes at the next `spendflow images gc` unless another user has it)",
                    image.sha256
                ),
                None => println!("user {user_id} had no image"),
            }
        }
        ImagesCommand::Gc {
            grace_minutes,
            tmp_age_minutes,
            dry_run,
            services,
        } => {
            let personnel = services.connect()?;
            let options = GcOptions {
                blob_grace: Duration::from_secs(grace_minutes * 60),
                temp_age: Duration::from_secs(tmp_age_minutes * 60),
                dry_run,
            };
            let report = runtime()?
                .block_on(personnel.collect_garbage(options))
                .map_err(refused)
                .context("garbage collection")?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for sha in &report.removed_blobs {
                println!("{verb} blob {sha}");
            }
            for name in &report.removed_temp {
                println!("{verb} temporary file {name}");
            }
            println!("{}{report}", if dry_run { "dry run: " } else { "" });
        }
    }
    Ok(())
}

/// Starts `generate --avatars` beside the generator: a thread that attaches an avatar to every
/// user once the generator has written them.
pub fn start_avatars(
    mysql: &str,
    hdfs: Option<&str>,
    seed: u64,
    users: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let Some(hdfs) = hdfs else {
        bail!("--avatars needs --hdfs URL (or SPENDFLOW_HDFS)");
    };
    let config = PersonnelConfig::new(mysql, hdfs);
    config.validate()?;
    std::thread::Builder::new()
        .name("spendflow-avatars".into())
        .spawn(move || {
            let summary = spendflow_engine::personnel::avatars::attach_when_ready(
                &config,
                seed,
                users,
                Duration::from_secs(120),
                &stop,
            )?;
            tracing::info!(
                uploaded = summary.uploaded,
                skipped = summary.skipped,
                missing = summary.missing,
                stopped = summary.stopped,
                "Avatars attached (users who had a picture keep it)."
            );
            Ok(())
        })
        .context("could not start the avatar thread")
}
