package nodeagent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The services namespace takes the pod CIDR's last usable address, which the pod allocator
// then skips.
func TestServicesAddrIsLastUsable(t *testing.T) {
	for cidr, want := range map[string]string{
		"10.244.0.0/24": "10.244.0.254",
		"10.244.0.0/16": "10.244.255.254",
		"10.1.2.0/30":   "10.1.2.2",
	} {
		n, err := newNetwork("test0", cidr)
		if err != nil {
			t.Fatal(err)
		}
		if got := n.servicesAddr(); got != netip.MustParseAddr(want) {
			t.Errorf("%s: servicesAddr %s, want %s", cidr, got, want)
		}
	}
}

// TestSandboxNamespaceAddressAndRoutes creates a pod sandbox on a bridge of its own: the
// namespace gets its address on eth0, its default route and the service and DNS routes, the
// veth's host end sits on the bridge; a second sandbox for the same pod (a retry) replaces the
// first; release removes the namespace.
func TestSandboxNamespaceAddressAndRoutes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates network namespaces and needs root")
	}
	ctx := context.Background()
	bridge := fmt.Sprintf("lct%d", os.Getpid()%100000)
	if err := ipCmd(ctx, "link", "add", bridge, "type", "bridge"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ipCmd(ctx, "link", "del", bridge) })
	if err := ipCmd(ctx, "link", "set", bridge, "up"); err != nil {
		t.Fatal(err)
	}
	n, err := newNetwork(bridge, "10.251.7.0/24")
	if err != nil {
		t.Fatal(err)
	}
	n.serviceCIDR = netip.MustParsePrefix("10.252.0.0/16")
	n.clusterDNS = netip.MustParseAddr("10.252.0.10")
	uid := fmt.Sprintf("sandbox-test-%d", os.Getpid())
	t.Cleanup(func() { n.release(ctx, uid) })
	for attempt := 1; attempt <= 2; attempt++ {
		ip, err := n.sandbox(ctx, uid)
		if err != nil {
			t.Fatalf("attempt %d: %v", attempt, err)
		}
		// Ready for the container's first packet (its ARP request for the gateway) when
		// sandbox returns.
		if !portForwarding("lv" + strings.TrimPrefix(nsName(uid), nsPrefix)) {
			t.Errorf("attempt %d: the veth's host end is not a forwarding bridge port yet", attempt)
		}
		if ip != netip.MustParseAddr("10.251.7.2") {
			t.Errorf("attempt %d: pod IP %s, want the first after the gateway", attempt, ip)
		}
		addr, _ := exec.Command("ip", "-n", nsName(uid), "-o", "addr", "show", "eth0").CombinedOutput()
		if !strings.Contains(string(addr), "10.251.7.2/24") {
			t.Errorf("attempt %d: eth0 in the namespace: %s", attempt, addr)
		}
		routes, _ := exec.Command("ip", "-n", nsName(uid), "route").CombinedOutput()
		for _, want := range []string{"default via 10.251.7.1", "10.252.0.0/16 via 10.251.7.254", "10.252.0.10 via 10.251.7.1"} {
			if !strings.Contains(string(routes), want) {
				t.Errorf("attempt %d: routes lack %q:\n%s", attempt, want, routes)
			}
		}
		host := "lv" + strings.TrimPrefix(nsName(uid), nsPrefix)
		link, _ := exec.Command("ip", "-o", "link", "show", host).CombinedOutput()
		if !strings.Contains(string(link), "master "+bridge) || !strings.Contains(string(link), "UP") {
			t.Errorf("attempt %d: host end of the veth: %s", attempt, link)
		}
	}
	n.release(ctx, uid)
	if _, err := os.Stat(nsPath(uid)); err == nil {
		t.Error("the namespace outlived release")
	}
}

// TestBridgeKeepsItsAddress: the bridge's address is set, so a port with a lower address (a new
// pod's veth) does not change it.
func TestBridgeKeepsItsAddress(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates a bridge and needs root")
	}
	ctx := context.Background()
	bridge := fmt.Sprintf("lcb%d", os.Getpid()%100000)
	n, err := newNetwork(bridge, "10.251.9.0/24")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ipCmd(ctx, "link", "del", bridge) })
	if err := n.ensureBridge(ctx); err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprintf("lcp%d", os.Getpid()%100000)
	if err := ipCmd(ctx, "link", "add", port, "address", "00:00:00:00:00:01", "type", "veth", "peer", "name", port+"x"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ipCmd(ctx, "link", "del", port) })
	if err := ipCmd(ctx, "link", "set", port, "master", bridge, "up"); err != nil {
		t.Fatal(err)
	}
	iface, err := net.InterfaceByName(bridge)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := iface.HardwareAddr.String(), "02:1c:0a:fb:09:01"; got != want {
		t.Errorf("bridge address %s after a port with a lower one joined, want %s", got, want)
	}
	// Idempotent on an existing bridge.
	if err := n.ensureBridge(ctx); err != nil {
		t.Fatal(err)
	}
}
