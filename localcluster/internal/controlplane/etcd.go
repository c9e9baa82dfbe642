package controlplane

import (
	"fmt"
	"net/url"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// startEtcd runs an embedded single-member etcd on loopback and returns once it serves.
func startEtcd(c Config) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "local"
	cfg.Dir = filepath.Join(c.StateDir, "etcd")
	client, err := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPort))
	if err != nil {
		return nil, fmt.Errorf("etcd client url: %w", err)
	}
	peer, err := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", c.EtcdPeerPort))
	if err != nil {
		return nil, fmt.Errorf("etcd peer url: %w", err)
	}
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(c.StateDir, "logs", "etcd.log")}
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	cfg.QuotaBackendBytes = 2 << 30
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("starting etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd failed before ready: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd not ready after 60s")
	}
}
