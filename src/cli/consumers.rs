//! `bus consumers list|delete`: the durable consumers of a namespace, through a running
//! server's admin endpoints.

use clap::{Args, Subcommand};

use super::HostArgs;

#[derive(Debug, Args)]
pub struct ConsumersArgs {
    #[command(subcommand)]
    pub command: ConsumersCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConsumersCommand {
    /// List a namespace's durable consumers, one JSON object per line.
    #[command(after_help = "Example:
  bus consumers list --namespace orders")]
    List {
        #[command(flatten)]
        host: HostArgs,
        /// The namespace whose consumers to list.
        #[arg(long)]
        namespace: String,
    },
    /// Delete a durable consumer: its connections' streams end, its progress is forgotten.
    #[command(after_help = "Example:
  bus consumers delete --namespace orders --name billing")]
    Delete {
        #[command(flatten)]
        host: HostArgs,
        /// The consumer's namespace.
        #[arg(long)]
        namespace: String,
        /// The consumer's name.
        #[arg(long)]
        name: String,
    },
}

pub async fn run(args: ConsumersArgs) -> anyhow::Result<()> {
    match args.command {
        ConsumersCommand::List { host, namespace } => {
            for consumer in host.client()?.consumers(&namespace).await? {
                println!("{}", serde_json::to_string(&consumer)?);
            }
        }
        ConsumersCommand::Delete {
            host,
            namespace,
            name,
        } => host.client()?.delete_consumer(&namespace, &name).await?,
    }
    Ok(())
}
