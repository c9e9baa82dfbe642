package main

import (
	"context"
	"path/filepath"

	"warren.dev/localcluster/internal/controlplane"
	"warren.dev/localcluster/nodeagent"
)

// nodeAgent returns the function that runs the node agent inside `up`.
func nodeAgent(cfg controlplane.Config, f upFlags) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		return nodeagent.Run(ctx, nodeagent.Config{
			Kubeconfig:    filepath.Join(cfg.StateDir, controlplane.NodeKubecfg),
			StateDir:      filepath.Join(cfg.StateDir, "nodeagent"),
			NodeName:      controlplane.NodeName,
			NodeIP:        controlplane.NodeBridgeIP,
			ImageMap:      f.imageMap,
			KubeletCert:   cfg.PKI.KubeletServingCert,
			KubeletKey:    cfg.PKI.KubeletServKey,
			ClientCA:      cfg.PKI.CACert,
			KubeletPort:   controlplane.KubeletPort,
			PodCIDR:       controlplane.NodePodCIDR,
			ClusterDNS:    controlplane.ClusterDNSIP,
			ServiceCIDR:   controlplane.ServiceCIDR,
			ClusterDomain: controlplane.ClusterDomain,
		})
	}
}
