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
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// network: a host bridge holding the first address of the pod CIDR; each pod a network
// namespace (ip netns) with a veth whose host end is on the bridge. The cluster DNS address is
// a /32 on the bridge (this kernel has no dummy interfaces). Service ClusterIPs live in a
// namespace of their own (servicesNS, on the bridge at the pod CIDR's last address) where the
// service proxy listens: in the host's namespace a ClusterIP:port listener cannot bind when a
// host program listens on the same port on every address (the machine's own RabbitMQ on
// *:5672), and the pods' connections would reach that program instead.
type network struct {
	bridge  string
	gateway netip.Addr
	prefix  netip.Prefix

	serviceCIDR netip.Prefix // routed to servicesAddr, from the host and from every pod
	clusterDNS  netip.Addr   // stays on the host (routed to the gateway from pods)

	mu    sync.Mutex
	inUse map[netip.Addr]string // ip -> pod uid

	// noForwardingWait leaves out waitForwarding (the baseline of BenchmarkFirstConnect).
	noForwardingWait bool
}

const (
	nsPrefix = "lc-"
	// servicesNS holds the ClusterIPs and the service proxy's listeners; servicesVeth is its
	// veth's host end on the bridge.
	servicesNS   = nsPrefix + "services"
	servicesVeth = "lvservices"
)

func servicesNSPath() string { return filepath.Join("/run/netns", servicesNS) }

// servicesAddr is the last address of the pod CIDR before its broadcast address.
func (n *network) servicesAddr() netip.Addr {
	b := n.prefix.Addr().AsSlice()
	for i := n.prefix.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	last, _ := netip.AddrFromSlice(b)
	return last.Prev()
}

// setupServices creates servicesNS on the bridge and routes the service CIDR to it from the
// host (pods get the same route in sandbox). Call after setup.
func (n *network) setupServices(ctx context.Context, serviceCIDR, clusterDNS string) error {
	cidr, err := netip.ParsePrefix(serviceCIDR)
	if err != nil {
		return fmt.Errorf("service CIDR %q: %w", serviceCIDR, err)
	}
	dns, err := netip.ParseAddr(clusterDNS)
	if err != nil {
		return fmt.Errorf("cluster DNS %q: %w", clusterDNS, err)
	}
	n.serviceCIDR, n.clusterDNS = cidr.Masked(), dns
	ip := n.servicesAddr()
	n.mu.Lock()
	n.inUse[ip] = servicesNS
	n.mu.Unlock()
	_ = ipCmd(ctx, "netns", "del", servicesNS)
	_ = ipCmd(ctx, "link", "del", servicesVeth)
	steps := [][]string{
		{"netns", "add", servicesNS},
		{"link", "add", servicesVeth, "type", "veth", "peer", "name", "eth0", "netns", servicesNS},
		{"link", "set", servicesVeth, "master", n.bridge, "up"},
		{"-n", servicesNS, "link", "set", "lo", "up"},
		{"-n", servicesNS, "addr", "add", fmt.Sprintf("%s/%d", ip, n.prefix.Bits()), "dev", "eth0"},
		{"-n", servicesNS, "link", "set", "eth0", "up"},
		{"route", "replace", n.serviceCIDR.String(), "via", ip.String(), "dev", n.bridge},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

// addServiceAddr puts a ClusterIP in servicesNS (idempotent).
func (n *network) addServiceAddr(ctx context.Context, a netip.Addr) error {
	return ipCmd(ctx, "-n", servicesNS, "addr", "replace", a.String()+"/32", "dev", "lo")
}

func (n *network) delServiceAddr(ctx context.Context, a netip.Addr) {
	_ = ipCmd(ctx, "-n", servicesNS, "addr", "del", a.String()+"/32", "dev", "lo")
}

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
	if err := n.ensureBridge(ctx); err != nil {
		return err
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

// ensureBridge creates the bridge (if missing) with an address of its own (bridgeMAC): a bridge
// whose address was never set takes the lowest of its ports' addresses, so a new pod's veth could
// change it while another pod had just resolved the gateway to the old one; that pod's next
// packets went to an address nobody owned (a TCP connect then waited for its SYN to be resent,
// 1 s later).
func (n *network) ensureBridge(ctx context.Context) error {
	if _, err := net.InterfaceByName(n.bridge); err != nil {
		if err := ipCmd(ctx, "link", "add", n.bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	return ipCmd(ctx, "link", "set", n.bridge, "address", bridgeMAC(n.gateway))
}

// bridgeMAC is a locally administered unicast address made of the gateway's IPv4 address.
func bridgeMAC(gateway netip.Addr) string {
	b := gateway.As4()
	return fmt.Sprintf("02:1c:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3])
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

// teardown removes the services namespace and the bridge when the agent stops.
func (n *network) teardown() {
	_ = ipCmd(context.Background(), "netns", "del", servicesNS)
	if _, err := net.InterfaceByName(n.bridge); err == nil {
		_ = ipCmd(context.Background(), "link", "del", n.bridge)
	}
}

// addHostAddr puts an address (the cluster DNS) on the bridge.
func (n *network) addHostAddr(ctx context.Context, a netip.Addr) error {
	if n.hasAddr(a) {
		return nil
	}
	return ipCmd(ctx, "addr", "add", a.String()+"/32", "dev", n.bridge)
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
	// What an earlier, failed attempt for this pod left behind (looked up here: each ip run
	// costs a process start).
	if _, err := os.Stat(nsPath(uid)); err == nil {
		_ = ipCmd(ctx, "netns", "del", name)
	}
	if _, err := net.InterfaceByName(host); err == nil {
		_ = ipCmd(ctx, "link", "del", host)
	}
	// Three ip runs, not one per step: a pod start waits for them (about 10 ms each on a
	// loaded 2-core machine). The namespace's own steps run in it (ip -n, batch mode).
	onHost := [][]string{
		{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name},
		{"link", "set", host, "master", n.bridge, "up"},
	}
	inPod := [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", fmt.Sprintf("%s/%d", ip, n.prefix.Bits()), "dev", "eth0"},
		{"link", "set", "eth0", "up"},
		{"route", "add", "default", "via", n.gateway.String()},
	}
	if n.serviceCIDR.IsValid() {
		inPod = append(inPod,
			[]string{"route", "add", n.serviceCIDR.String(), "via", n.servicesAddr().String()},
			[]string{"route", "add", n.clusterDNS.String() + "/32", "via", n.gateway.String()})
	}
	err := ipCmd(ctx, "netns", "add", name)
	if err == nil {
		err = ipBatch(ctx, "", onHost)
	}
	if err == nil {
		err = ipBatch(ctx, name, inPod)
	}
	if err != nil {
		n.release(ctx, uid)
		return netip.Addr{}, err
	}
	if !n.noForwardingWait {
		waitForwarding(ctx, host, 2*time.Second)
	}
	return ip, nil
}

// waitForwarding waits until the veth's host end is up and a forwarding port of the bridge (the
// kernel applies the carrier change asynchronously, a few ms after the namespace's end came up).
// A container started before that lost its first ARP request for the gateway and retried it 1 s
// later (BenchmarkFirstConnect on this machine: 3.5-5 % of the first connects right after the
// sandbox took 1 s without the wait, none of 300 with it; the wait is typically under 5 ms). After
// the timeout it logs and goes on: the pod then starts as it did before.
func waitForwarding(ctx context.Context, host string, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if portForwarding(host) {
			return
		}
		time.Sleep(time.Millisecond)
	}
	klog.InfoS("pod network: the veth is not a forwarding bridge port yet; starting anyway", "veth", host, "after", timeout)
}

// portForwarding: the interface is up and its bridge port forwards (state 3).
func portForwarding(iface string) bool {
	state, err := os.ReadFile(filepath.Join("/sys/class/net", iface, "brport", "state"))
	if err != nil || strings.TrimSpace(string(state)) != "3" {
		return false
	}
	oper, err := os.ReadFile(filepath.Join("/sys/class/net", iface, "operstate"))
	return err == nil && strings.TrimSpace(string(oper)) == "up"
}

// ipBatch runs ip commands in one ip process (-batch), in the namespace netns when it is not
// empty; it stops at the first that fails.
func ipBatch(ctx context.Context, netns string, cmds [][]string) error {
	var args []string
	if netns != "" {
		args = append(args, "-n", netns)
	}
	args = append(args, "-batch", "-")
	lines := make([]string, len(cmds))
	for i, c := range cmds {
		lines[i] = strings.Join(c, " ")
	}
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s <<< %q: %w: %s", strings.Join(args, " "), lines, err, strings.TrimSpace(string(out)))
	}
	return nil
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
