// Command localcluster runs a single-node Kubernetes cluster on this machine:
// embedded etcd, kube-apiserver, kube-controller-manager and kube-scheduler
// from the upstream Go modules, plus a node agent that runs pods as local
// processes. See `localcluster help`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/component-base/version"
	"k8s.io/klog/v2"

	"warren.dev/localcluster/internal/controlplane"
)

const usage = `localcluster runs a local Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) and a node agent in one process.

Usage:
  localcluster up [--state-dir DIR] [--control-plane-only]   run until SIGTERM/SIGINT
  localcluster certs [--state-dir DIR]                      only write certificates and kubeconfigs
  localcluster version                                      print the Kubernetes version built in

The admin kubeconfig is DIR/admin.kubeconfig; the apiserver listens on https://127.0.0.1:6443.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "up":
		err = up(os.Args[2:])
	case "certs":
		err = certs(os.Args[2:])
	case "version":
		fmt.Println(version.Get().GitVersion)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "localcluster %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

type upFlags struct {
	stateDir         string
	controlPlaneOnly bool
	imageMap         string
	portOffset       int
	hpaSyncPeriod    time.Duration
}

func parse(name string, args []string) (upFlags, error) {
	var f upFlags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(&f.stateDir, "state-dir", envOr("LOCALCLUSTER_STATE_DIR", ".local/cluster"), "state directory (etcd data, certificates, kubeconfigs, logs) [env LOCALCLUSTER_STATE_DIR]")
	fs.BoolVar(&f.controlPlaneOnly, "control-plane-only", false, "do not start the node agent")
	fs.StringVar(&f.imageMap, "image-map", envOr("LOCALCLUSTER_IMAGE_MAP", "localcluster/images.yaml"), "image -> local program mapping for the node agent [env LOCALCLUSTER_IMAGE_MAP]")
	fs.IntVar(&f.portOffset, "port-offset", 0, "added to every control-plane port (apiserver 6443, etcd 23790/23800, controller-manager 10257, scheduler 10259), to run a second cluster beside one")
	hpaSync, err := durationEnv("LOCALCLUSTER_HPA_SYNC_PERIOD", 15*time.Second)
	if err != nil {
		return f, err
	}
	fs.DurationVar(&f.hpaSyncPeriod, "hpa-sync-period", hpaSync, "kube-controller-manager --horizontal-pod-autoscaler-sync-period: how often the HPA controller reads metrics and scales [env LOCALCLUSTER_HPA_SYNC_PERIOD]")
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	fs.Var(klogFlags.Lookup("v").Value, "v", "log verbosity of the Kubernetes components")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	return f, nil
}

func (f upFlags) config() controlplane.Config {
	c := controlplane.DefaultConfig(f.stateDir)
	c.APIServerPort += f.portOffset
	c.EtcdPort += f.portOffset
	c.EtcdPeerPort += f.portOffset
	c.ControllerManagerPort += f.portOffset
	c.SchedulerPort += f.portOffset
	c.HPASyncPeriod = f.hpaSyncPeriod
	return c
}

// durationEnv reads a duration ("1s", "15s") from the environment, def when unset.
func durationEnv(k string, def time.Duration) (time.Duration, error) {
	v := os.Getenv(k)
	if v == "" {
		return def, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q: %w", k, v, err)
	}
	return d, nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func certs(args []string) error {
	f, err := parse("certs", args)
	if err != nil {
		return err
	}
	return controlplane.Prepare(f.config())
}

func up(args []string) error {
	f, err := parse("up", args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg := f.config()
	if !f.controlPlaneOnly {
		cfg.NodeAgent = nodeAgent(cfg, f)
	}
	klog.InfoS("starting local cluster", "version", version.Get().GitVersion, "stateDir", f.stateDir)
	return controlplane.Run(ctx, cfg)
}
