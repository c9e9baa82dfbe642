package controlplane

import (
	"context"
	"fmt"
	"strconv"

	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	schedulerapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	scheduleroptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// runner starts a prepared component and serves until ctx ends.
type runner func(ctx context.Context) error

// prepareAPIServer builds kube-apiserver from its upstream option types
// (NewServerRunOptions -> flags -> Complete -> Validate -> Run).
func prepareAPIServer(c Config) (runner, error) {
	s := apiserveroptions.NewServerRunOptions()
	p := c.PKI
	flags := map[string]string{
		"etcd-servers": fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPort),
		"bind-address": "127.0.0.1",
		// Endpoints may not be loopback: the `kubernetes` Service points at the
		// node bridge, and the node agent's service proxy forwards that endpoint
		// to the loopback listener (the apiserver stays bound to 127.0.0.1).
		"advertise-address":                  NodeBridgeIP,
		"secure-port":                        strconv.Itoa(c.APIServerPort),
		"tls-cert-file":                      p.APIServerCert,
		"tls-private-key-file":               p.APIServerKey,
		"client-ca-file":                     p.CACert,
		"service-cluster-ip-range":           ServiceCIDR,
		"service-account-issuer":             "https://kubernetes.default.svc." + ClusterDomain,
		"service-account-key-file":           p.SAPub,
		"service-account-signing-key-file":   p.SAKey,
		"authorization-mode":                 "Node,RBAC",
		"enable-admission-plugins":           "NodeRestriction",
		"allow-privileged":                   "true",
		"kubelet-client-certificate":         p.KubeletClientCert,
		"kubelet-client-key":                 p.KubeletClientKey,
		"kubelet-certificate-authority":      p.CACert,
		"kubelet-preferred-address-types":    "InternalIP",
		"requestheader-client-ca-file":       p.FrontProxyCACert,
		"requestheader-allowed-names":        "front-proxy-client",
		"requestheader-username-headers":     "X-Remote-User",
		"requestheader-group-headers":        "X-Remote-Group",
		"requestheader-extra-headers-prefix": "X-Remote-Extra-",
		"proxy-client-cert-file":             p.FrontProxyClientCert,
		"proxy-client-key-file":              p.FrontProxyKey,
		// The apiserver runs on the host, outside the pod network's service
		// proxy: aggregated APIs are reached at their endpoint (pod) IPs.
		"enable-aggregator-routing": "true",
		"profiling":                 "false",
		"event-ttl":                 "1h",
		"audit-policy-file":         c.path(auditPolicyFile),
		"audit-log-path":            c.path("logs/audit.log"),
		"audit-log-maxsize":         "200",
		"audit-log-maxbackup":       "1",
	}
	if err := applyFlags("kube-apiserver", s.Flags(), flags); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
			return fmt.Errorf("kube-apiserver feature gates: %w", err)
		}
		rest.SetDefaultWarningHandler(rest.NoWarnings{})
		completed, err := s.Complete(ctx)
		if err != nil {
			return fmt.Errorf("kube-apiserver options: %w", err)
		}
		if errs := completed.Validate(); len(errs) != 0 {
			return fmt.Errorf("kube-apiserver options: %w", utilerrors.NewAggregate(errs))
		}
		return apiserverapp.Run(ctx, completed)
	}, nil
}

// prepareControllerManager sets up kube-controller-manager with its default
// controllers (deployment, replicaset, statefulset, garbage collector,
// namespace, service account + token, endpointslice, job, PV binder, HPA, ...).
// It must run before the other components add the shared feature gates to a
// flag set: its Flags() turns client-go's WatchListClient on, as the upstream
// binary does, which is refused once the gates are frozen into a flag set.
func prepareControllerManager(c Config) (runner, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, fmt.Errorf("kube-controller-manager options: %w", err)
	}
	p := c.PKI
	kubeconfig := c.path("controller-manager.kubeconfig")
	flags := map[string]string{
		"kubeconfig":                       kubeconfig,
		"authentication-kubeconfig":        kubeconfig,
		"authorization-kubeconfig":         kubeconfig,
		"bind-address":                     "127.0.0.1",
		"secure-port":                      strconv.Itoa(c.ControllerManagerPort),
		"leader-elect":                     "false",
		"controllers":                      "*",
		"use-service-account-credentials":  "true",
		"service-account-private-key-file": p.SAKey,
		"root-ca-file":                     p.CACert,
		"cluster-signing-cert-file":        p.CACert,
		"cluster-signing-key-file":         p.CAKey,
		"client-ca-file":                   p.CACert,
		"requestheader-client-ca-file":     p.FrontProxyCACert,
		"service-cluster-ip-range":         ServiceCIDR,
		"cluster-cidr":                     PodCIDR,
		"allocate-node-cidrs":              "false",
		"profiling":                        "false",
	}
	if c.HPASyncPeriod > 0 {
		flags["horizontal-pod-autoscaler-sync-period"] = c.HPASyncPeriod.String()
	}
	nfs := s.Flags(kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
	s.ParsedFlags = &nfs
	if err := applyFlags("kube-controller-manager", nfs, flags); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if err := s.ComponentGlobalsRegistry.Set(); err != nil {
			return fmt.Errorf("kube-controller-manager feature gates: %w", err)
		}
		cfg, err := s.Config(ctx, kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
		if err != nil {
			return fmt.Errorf("kube-controller-manager config: %w", err)
		}
		return kcmapp.Run(ctx, cfg.Complete())
	}, nil
}

// prepareScheduler sets up kube-scheduler with its default profile.
func prepareScheduler(c Config) (runner, error) {
	opts := scheduleroptions.NewOptions()
	kubeconfig := c.path("scheduler.kubeconfig")
	flags := map[string]string{
		"kubeconfig":                kubeconfig,
		"authentication-kubeconfig": kubeconfig,
		"authorization-kubeconfig":  kubeconfig,
		"bind-address":              "127.0.0.1",
		"secure-port":               strconv.Itoa(c.SchedulerPort),
		"leader-elect":              "false",
		"profiling":                 "false",
	}
	if err := applyFlags("kube-scheduler", *opts.Flags, flags); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
			return fmt.Errorf("kube-scheduler feature gates: %w", err)
		}
		cc, sched, err := schedulerapp.Setup(ctx, opts)
		if err != nil {
			return fmt.Errorf("kube-scheduler setup: %w", err)
		}
		return schedulerapp.Run(ctx, cc, sched)
	}, nil
}
