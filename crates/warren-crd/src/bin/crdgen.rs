//! Prints the QueueScaler CustomResourceDefinition as YAML.
//!
//! `make crds` runs it into `manifests/crds.yaml` and the chart's `crds/`.

fn main() -> anyhow::Result<()> {
    print!("{}", warren_crd::crd_yaml()?);
    Ok(())
}
