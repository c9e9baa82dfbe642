package nodeagent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// network: a host bridge holding the first address of the pod CIDR; each pod a network
// namespace (ip netns) with a veth whose host end is on the bridge. Service ClusterIPs and the
// cluster DNS address are /32 addresses on the bridge (this kernel has no dummy interfaces), so
// pods reach them through their default route and the host answers for them.
type network struct {
	bridge  string
	gateway netip.Addr
	prefix  netip.Prefix

	mu    sync.Mutex
	inUse map[netip.Addr]string // ip -> pod uid
}

const nsPrefix = "lc-"

func newNetwork(bridge, podCIDR string) (*network, error) {
	prefix, err := netip.ParsePrefix(podCIDR)
	if err != nil {
		return nil, fmt.Errorf("pod CIDR %q: %w", podCIDR, err)
	}
	prefix = prefix.Masked()
	return &network{bridge: bridge, prefix: prefix, gateway: prefix.Addr().Next(), inUse: map[netip.Addr]string{}}, nil
}

func ipCmd(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setup creates the bridge (idempotent) and removes namespaces a previous run left behind.
func (n *network) setup(ctx context.Context) error {
	if _, err := net.InterfaceByName(n.bridge); err != nil {
		if err := ipCmd(ctx, "link", "add", n.bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	addr := fmt.Sprintf("%s/%d", n.gateway, n.prefix.Bits())
	if !n.hasAddr(n.gateway) {
		if err := ipCmd(ctx, "addr", "add", addr, "dev", n.bridge); err != nil {
			return err
		}
	}
	if err := ipCmd(ctx, "link", "set", n.bridge, "up"); err != nil {
		return err
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), nsPrefix) {
			// An agent killed hard leaves daemons (epmd) holding its pods' namespaces.
			killNetnsProcesses(filepath.Join("/run/netns", e.Name()))
			_ = ipCmd(ctx, "netns", "del", e.Name())
		}
	}
	return nil
}

func (n *network) hasAddr(a netip.Addr) bool {
	iface, err := net.InterfaceByName(n.bridge)
	if err != nil {
		return false
	}
	addrs, err := iface.Addrs()
	if err != nil {
		return false
	}
	for _, x := range addrs {
		if ipn, ok := x.(*net.IPNet); ok {
			if p, ok := netip.AddrFromSlice(ipn.IP); ok && p.Unmap() == a {
				return true
			}
		}
	}
	return false
}

// teardown removes the bridge (with the service addresses on it) when the agent stops.
func (n *network) teardown() {
	if _, err := net.InterfaceByName(n.bridge); err == nil {
		_ = ipCmd(context.Background(), "link", "del", n.bridge)
	}
}

// addHostAddr puts a service address on the bridge.
func (n *network) addHostAddr(ctx context.Context, a netip.Addr) error {
	if n.hasAddr(a) {
		return nil
	}
	return ipCmd(ctx, "addr", "add", a.String()+"/32", "dev", n.bridge)
}

func (n *network) delHostAddr(ctx context.Context, a netip.Addr) {
	if n.hasAddr(a) {
		_ = ipCmd(ctx, "addr", "del", a.String()+"/32", "dev", n.bridge)
	}
}

func nsName(uid string) string {
	h := sha256.Sum256([]byte(uid))
	return nsPrefix + hex.EncodeToString(h[:5])
}

func nsPath(uid string) string { return filepath.Join("/run/netns", nsName(uid)) }

// sandbox creates the pod's network namespace and address; it returns the pod IP.
func (n *network) sandbox(ctx context.Context, uid string) (netip.Addr, error) {
	n.mu.Lock()
	var ip netip.Addr
	for a := n.gateway.Next(); n.prefix.Contains(a); a = a.Next() {
		if owner, used := n.inUse[a]; !used || owner == uid {
			ip = a
			break
		}
	}
	if ip.IsValid() {
		n.inUse[ip] = uid
	}
	n.mu.Unlock()
	if !ip.IsValid() || !n.prefix.Contains(ip.Next()) {
		return netip.Addr{}, fmt.Errorf("pod CIDR %s exhausted", n.prefix)
	}
	name := nsName(uid)
	host := "lv" + strings.TrimPrefix(name, nsPrefix)
	_ = ipCmd(ctx, "netns", "del", name)
	_ = ipCmd(ctx, "link", "del", host)
	steps := [][]string{
		{"netns", "add", name},
		{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name},
		{"link", "set", host, "master", n.bridge, "up"},
		{"-n", name, "link", "set", "lo", "up"},
		{"-n", name, "addr", "add", fmt.Sprintf("%s/%d", ip, n.prefix.Bits()), "dev", "eth0"},
		{"-n", name, "link", "set", "eth0", "up"},
		{"-n", name, "route", "add", "default", "via", n.gateway.String()},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			n.release(ctx, uid)
			return netip.Addr{}, err
		}
	}
	return ip, nil
}

// release deletes the namespace (its veth goes with it) and frees the address.
func (n *network) release(ctx context.Context, uid string) {
	_ = ipCmd(ctx, "netns", "del", nsName(uid))
	n.mu.Lock()
	for a, owner := range n.inUse {
		if owner == uid {
			delete(n.inUse, a)
		}
	}
	n.mu.Unlock()
}

// inNetns runs fn on a thread switched into the namespace at path (sockets created there stay
// in it), then switches back.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with this goroutine instead of serving others
			// in the wrong namespace.
			errc <- fmt.Errorf("restoring netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
