// Package controlplane runs etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler in one process, from the upstream Kubernetes option types.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"warren.dev/localcluster/internal/pki"
)

// Cluster-wide constants shared with the node agent (see localcluster/README.md).
const (
	PodCIDR        = "10.244.0.0/16"
	NodePodCIDR    = "10.244.0.0/24"
	ServiceCIDR    = "10.96.0.0/16"
	APIServiceIP   = "10.96.0.1"
	ClusterDNSIP   = "10.96.0.10"
	ClusterDomain  = "cluster.local"
	NodeName       = "local-node"
	NodeBridgeIP   = "10.244.0.1"
	KubeletPort    = 10250
	AdminKubecfg   = "admin.kubeconfig"
	NodeKubecfg    = "node.kubeconfig"
	defaultAPIPort = 6443
	// shutdownTimeout bounds the wait for components (pods' grace periods included).
	shutdownTimeout = 90 * time.Second
)

const auditPolicyFile = "audit-policy.yaml"

// auditPolicy records who changed workloads and pods (the end-to-end test reads
// logs/audit.log to see which identity scaled the workers), the scheduler's bindings
// and the node agent's pod status writes (with microsecond timestamps: the stages of a
// pod's start, scale patch → pod created → bound → status written), and nothing else.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete]
  resources:
  - group: apps
    resources: [deployments, deployments/scale, replicasets, statefulsets]
  - group: ""
    resources: [pods, pods/binding, pods/status]
- level: None
`

// Config selects where the state lives and which loopback ports are used.
type Config struct {
	StateDir              string
	APIServerPort         int
	EtcdPort              int
	EtcdPeerPort          int
	ControllerManagerPort int
	SchedulerPort         int
	PKI                   pki.Layout
	// HPASyncPeriod is kube-controller-manager's --horizontal-pod-autoscaler-sync-period
	// (the upstream default, 15s, when zero).
	HPASyncPeriod time.Duration
	// NodeAgent, when set, runs once the apiserver is ready and the
	// cluster's bootstrap objects exist; its error ends the cluster.
	NodeAgent func(ctx context.Context) error
}

// DefaultConfig returns the documented default ports for stateDir.
func DefaultConfig(stateDir string) Config {
	return Config{
		StateDir:              stateDir,
		APIServerPort:         defaultAPIPort,
		EtcdPort:              23790,
		EtcdPeerPort:          23800,
		ControllerManagerPort: 10257,
		SchedulerPort:         10259,
		PKI:                   pki.NewLayout(filepath.Join(stateDir, "pki")),
		HPASyncPeriod:         15 * time.Second,
	}
}

func (c Config) path(name string) string { return filepath.Join(c.StateDir, name) }

// Server is the apiserver's URL.
func (c Config) Server() string { return fmt.Sprintf("https://127.0.0.1:%d", c.APIServerPort) }

// Prepare creates (or reuses) certificates, keys and kubeconfigs in the state dir.
func Prepare(c Config) error {
	for _, d := range []string{c.StateDir, c.PKI.Dir, c.path("logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	if err := os.WriteFile(c.path(auditPolicyFile), []byte(auditPolicy), 0o644); err != nil {
		return fmt.Errorf("writing audit policy: %w", err)
	}
	p := c.PKI
	ca, err := pki.LoadOrCreateCA(p.CACert, p.CAKey, "localcluster-ca")
	if err != nil {
		return err
	}
	fp, err := pki.LoadOrCreateCA(p.FrontProxyCACert, p.FrontProxyCAKey, "localcluster-front-proxy-ca")
	if err != nil {
		return err
	}
	leaves := []struct {
		ca        *pki.Authority
		cert, key string
		leaf      pki.Leaf
	}{
		{ca, p.APIServerCert, p.APIServerKey, pki.Leaf{
			CommonName: "kube-apiserver", Server: true,
			DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc." + ClusterDomain},
			IPs: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(APIServiceIP)},
		}},
		{ca, p.KubeletClientCert, p.KubeletClientKey, pki.Leaf{
			CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}, Client: true,
		}},
		{ca, p.KubeletServingCert, p.KubeletServKey, pki.Leaf{
			CommonName: NodeName, Server: true,
			DNSNames: []string{"localhost", NodeName},
			IPs:      []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(NodeBridgeIP)},
		}},
		{fp, p.FrontProxyClientCert, p.FrontProxyKey, pki.Leaf{CommonName: "front-proxy-client", Client: true}},
	}
	for _, l := range leaves {
		if err := l.ca.EnsureLeaf(l.cert, l.key, l.leaf); err != nil {
			return err
		}
	}
	if err := pki.EnsureServiceAccountKey(p.SAKey, p.SAPub); err != nil {
		return err
	}
	kubeconfigs := []struct {
		file, cn string
		orgs     []string
	}{
		{AdminKubecfg, "kubernetes-admin", []string{"system:masters"}},
		{"controller-manager.kubeconfig", "system:kube-controller-manager", nil},
		{"scheduler.kubeconfig", "system:kube-scheduler", nil},
		{NodeKubecfg, "system:node:" + NodeName, []string{"system:nodes"}},
	}
	for _, k := range kubeconfigs {
		file := c.path(k.file)
		if _, err := os.Stat(file); err == nil {
			continue
		}
		cert, key, err := ca.ClientPEM(k.cn, k.orgs...)
		if err != nil {
			return err
		}
		if err := os.WriteFile(file, pki.Kubeconfig(c.Server(), k.cn, ca.CertPEM, cert, key), 0o600); err != nil {
			return fmt.Errorf("writing %s: %w", file, err)
		}
	}
	return nil
}

// Run starts every component and blocks until ctx ends or one of them fails.
func Run(ctx context.Context, c Config) error {
	if err := Prepare(c); err != nil {
		return err
	}
	etcd, err := startEtcd(c)
	if err != nil {
		return err
	}
	defer etcd.Close()
	klog.InfoS("etcd ready", "url", fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPort))

	// Order matters: the controller-manager's options first (see prepareControllerManager).
	kcm, err := prepareControllerManager(c)
	if err != nil {
		return err
	}
	scheduler, err := prepareScheduler(c)
	if err != nil {
		return err
	}
	apiserver, err := prepareAPIServer(c)
	if err != nil {
		return err
	}

	parent := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	nodeCtx, nodeCancel := context.WithCancel(ctx)
	var controlPlane, node sync.WaitGroup
	// On the way out: first the node agent (it terminates its pods with their
	// grace periods and needs the apiserver for that), then the control plane,
	// then etcd (deferred above).
	defer func() {
		nodeCancel()
		waitBounded(&node, "node agent")
		cancel()
		waitBounded(&controlPlane, "control plane")
	}()
	errs := make(chan error, 4)
	start := func(name string, f runner) {
		wg, runCtx := &controlPlane, ctx
		if name == nodeAgentName {
			wg, runCtx = &node, nodeCtx
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := f(runCtx)
			if err == nil && ctx.Err() == nil {
				err = errors.New("exited")
			}
			if err != nil {
				err = fmt.Errorf("%s: %w", name, err)
			}
			errs <- err
		}()
	}
	start("kube-apiserver", apiserver)
	client, err := waitReady(parent, c, errs)
	if err != nil {
		return err
	}
	klog.InfoS("kube-apiserver ready", "server", c.Server())
	if err := bootstrap(parent, client); err != nil {
		return err
	}
	start("kube-controller-manager", kcm)
	start("kube-scheduler", scheduler)
	if c.NodeAgent != nil {
		start(nodeAgentName, c.NodeAgent)
	}
	select {
	case <-parent.Done():
		klog.InfoS("stopping local cluster")
		return nil
	case err := <-errs:
		return err
	case <-etcd.Err():
		return errors.New("etcd stopped")
	}
}

const nodeAgentName = "node agent"

func waitBounded(wg *sync.WaitGroup, what string) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(shutdownTimeout):
		klog.InfoS("still stopping; going on", "component", what, "after", shutdownTimeout)
	}
}

func waitReady(ctx context.Context, c Config, errs <-chan error) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.path(AdminKubecfg))
	if err != nil {
		return nil, fmt.Errorf("loading admin kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("admin client: %w", err)
	}
	deadline := time.After(3 * time.Minute)
	for {
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return client, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case err := <-errs:
			return nil, err
		case <-deadline:
			return nil, fmt.Errorf("kube-apiserver not ready after 3m: %v", err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
