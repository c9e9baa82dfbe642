package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// endpointAddr is one ready backend of a service port.
type endpointAddr struct {
	IP       string
	Port     int32
	Hostname string
}

// serviceEndpoints lists the endpoints of a service from its EndpointSlices; portName selects
// the port ("" for the unnamed one; nil: any, the port is then -1). Not-ready endpoints are left out, as kube-proxy and CoreDNS
// do (the EndpointSlice controller marks them ready when publishNotReadyAddresses is set).
func serviceEndpoints(slices []*discoveryv1.EndpointSlice, portName *string) []endpointAddr {
	var out []endpointAddr
	for _, s := range slices {
		if s.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		port := int32(-1)
		for _, p := range s.Ports {
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			if portName != nil && name == *portName && p.Port != nil {
				port = *p.Port
			}
		}
		for _, e := range s.Endpoints {
			if e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			h := ""
			if e.Hostname != nil {
				h = *e.Hostname
			}
			for _, ip := range e.Addresses {
				out = append(out, endpointAddr{IP: ip, Port: port, Hostname: h})
			}
		}
	}
	return out
}

func (a *agent) slicesOf(namespace, service string) []*discoveryv1.EndpointSlice {
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: service})
	slices, err := a.sliceLister.EndpointSlices(namespace).List(sel)
	if err != nil {
		return nil
	}
	return slices
}

// ---- service proxy ----

type listenerKey struct {
	ip   string
	port int32
}

type serviceProxy struct {
	a *agent
	kicker
	mu      sync.Mutex
	active  map[listenerKey]*proxyListener
	ips     map[string]bool
	counter atomic.Uint64
}

type proxyListener struct {
	ln        net.Listener
	namespace string
	service   string
	portName  string
}

func newServiceProxy(a *agent) *serviceProxy {
	return &serviceProxy{a: a, kicker: make(kicker, 1), active: map[listenerKey]*proxyListener{}, ips: map[string]bool{}}
}

// kicker is an informer handler that wakes a reconcile loop on any change.
type kicker chan struct{}

func (k kicker) handler() cache.ResourceEventHandler {
	kick := func(any) {
		select {
		case k <- struct{}{}:
		default:
		}
	}
	return cache.ResourceEventHandlerFuncs{AddFunc: kick, UpdateFunc: func(_, o any) { kick(o) }, DeleteFunc: kick}
}

func (p *serviceProxy) run(ctx context.Context) {
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		p.reconcile(ctx)
		select {
		case <-ctx.Done():
			p.mu.Lock()
			for k, l := range p.active {
				_ = l.ln.Close()
				delete(p.active, k)
			}
			for ip := range p.ips {
				if a, err := netip.ParseAddr(ip); err == nil {
					p.a.net.delServiceAddr(context.Background(), a)
				}
			}
			p.mu.Unlock()
			return
		case <-p.kicker:
		case <-tick.C:
		}
	}
}

// reconcile opens a listener on ClusterIP:port for every TCP service port and closes the rest.
func (p *serviceProxy) reconcile(ctx context.Context) {
	svcs, err := p.a.svcLister.List(labels.Everything())
	if err != nil {
		return
	}
	want := map[listenerKey]*corev1.Service{}
	names := map[listenerKey]string{}
	wantIPs := map[string]bool{}
	for _, s := range svcs {
		ip := s.Spec.ClusterIP
		if ip == "" || ip == corev1.ClusterIPNone {
			continue
		}
		wantIPs[ip] = true
		for _, sp := range s.Spec.Ports {
			if protocolOf(sp) != corev1.ProtocolTCP {
				continue
			}
			k := listenerKey{ip: ip, port: sp.Port}
			want[k] = s
			names[k] = sp.Name
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for ip := range wantIPs {
		if !p.ips[ip] {
			a, err := netip.ParseAddr(ip)
			if err != nil {
				continue
			}
			if err := p.a.net.addServiceAddr(ctx, a); err != nil {
				klog.ErrorS(err, "service address", "ip", ip)
				continue
			}
			p.ips[ip] = true
		}
	}
	for k, l := range p.active {
		s, ok := want[k]
		if !ok || s.Namespace != l.namespace || s.Name != l.service || names[k] != l.portName {
			_ = l.ln.Close()
			delete(p.active, k)
		}
	}
	for k, s := range want {
		if _, ok := p.active[k]; ok {
			continue
		}
		var ln net.Listener
		err := inNetns(servicesNSPath(), func() error {
			var err error
			ln, err = net.Listen("tcp", net.JoinHostPort(k.ip, strconv.Itoa(int(k.port))))
			return err
		})
		if err != nil {
			klog.ErrorS(err, "service listener", "service", s.Namespace+"/"+s.Name, "port", k.port)
			continue
		}
		l := &proxyListener{ln: ln, namespace: s.Namespace, service: s.Name, portName: names[k]}
		p.active[k] = l
		go p.serve(l)
	}
	for ip := range p.ips {
		if !wantIPs[ip] {
			if a, err := netip.ParseAddr(ip); err == nil {
				p.a.net.delServiceAddr(ctx, a)
			}
			delete(p.ips, ip)
		}
	}
}

func (p *serviceProxy) serve(l *proxyListener) {
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go p.forward(l, conn)
	}
}

func (p *serviceProxy) forward(l *proxyListener, conn net.Conn) {
	defer conn.Close()
	eps := serviceEndpoints(p.a.slicesOf(l.namespace, l.service), &l.portName)
	if len(eps) == 0 {
		return
	}
	start := int(p.counter.Add(1))
	var backend net.Conn
	var err error
	for i := range eps {
		ep := eps[(start+i)%len(eps)]
		if ep.Port < 0 {
			continue
		}
		ip := ep.IP
		if ip == p.a.cfg.NodeIP {
			// Host-network endpoints (the apiserver advertises the node IP and listens on
			// loopback) are reached on the host's loopback.
			ip = "127.0.0.1"
		}
		backend, err = net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(int(ep.Port))), 5*time.Second)
		if err == nil {
			break
		}
	}
	if backend == nil {
		return
	}
	defer backend.Close()
	splice(conn, backend)
}

// splice copies both ways until both directions are done, propagating half-closes.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = tc.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

// ---- cluster DNS ----

type dnsServer struct {
	a        *agent
	upstream string
}

func newDNSServer(a *agent) *dnsServer {
	return &dnsServer{a: a, upstream: hostNameserver()}
}

// hostNameserver is the first nameserver of the host's resolv.conf (for names outside the cluster).
func hostNameserver() string {
	raw, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			return net.JoinHostPort(f[1], "53")
		}
	}
	return ""
}

func (d *dnsServer) handler() cache.ResourceEventHandler { return cache.ResourceEventHandlerFuncs{} }

func (d *dnsServer) run(ctx context.Context) error {
	addr := net.JoinHostPort(d.a.cfg.ClusterDNS, "53")
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return fmt.Errorf("cluster DNS on %s: %w", addr, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		_ = pc.Close()
		return fmt.Errorf("cluster DNS on %s: %w", addr, err)
	}
	go func() {
		<-ctx.Done()
		_ = pc.Close()
		_ = ln.Close()
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go d.serveTCP(c)
		}
	}()
	buf := make([]byte, 4096)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			continue
		}
		q := append([]byte{}, buf[:n]...)
		go func() {
			if resp := d.answer(q); resp != nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}()
	}
}

func (d *dnsServer) serveTCP(c net.Conn) {
	defer c.Close()
	for {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return
		}
		q := make([]byte, int(l[0])<<8|int(l[1]))
		if _, err := io.ReadFull(c, q); err != nil {
			return
		}
		resp := d.answer(q)
		if resp == nil {
			return
		}
		if _, err := c.Write(append([]byte{byte(len(resp) >> 8), byte(len(resp))}, resp...)); err != nil {
			return
		}
	}
}

// answer resolves cluster names itself and forwards the others to the host's resolver.
func (d *dnsServer) answer(query []byte) []byte {
	var p dnsmessage.Parser
	hdr, err := p.Start(query)
	if err != nil {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	name := strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))
	domain := d.a.cfg.ClusterDomain
	if name != domain && !strings.HasSuffix(name, "."+domain) {
		return d.forward(query, hdr, q)
	}
	ips, exists := d.lookup(strings.TrimSuffix(name, "."+domain))
	rcode := dnsmessage.RCodeSuccess
	if !exists {
		rcode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: hdr.ID, Response: true, Authoritative: true, RecursionDesired: hdr.RecursionDesired, RecursionAvailable: true, RCode: rcode})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil
	}
	if err := b.Question(q); err != nil {
		return nil
	}
	if err := b.StartAnswers(); err != nil {
		return nil
	}
	if q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL {
		for _, ip := range ips {
			a, err := netip.ParseAddr(ip)
			if err != nil || !a.Is4() {
				continue
			}
			if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: a.As4()}); err != nil {
				return nil
			}
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// lookup resolves "<svc>.<ns>.svc", "<host>.<svc>.<ns>.svc" and "<a-b-c-d>.<ns>.pod".
func (d *dnsServer) lookup(rel string) ([]string, bool) {
	parts := strings.Split(rel, ".")
	switch {
	case len(parts) == 3 && parts[2] == "svc":
		s, err := d.a.svcLister.Services(parts[1]).Get(parts[0])
		if err != nil {
			return nil, false
		}
		if s.Spec.ClusterIP != "" && s.Spec.ClusterIP != corev1.ClusterIPNone {
			return []string{s.Spec.ClusterIP}, true
		}
		var ips []string
		seen := map[string]bool{}
		for _, e := range serviceEndpoints(d.a.slicesOf(parts[1], parts[0]), nil) {
			if !seen[e.IP] {
				seen[e.IP] = true
				ips = append(ips, e.IP)
			}
		}
		return ips, true
	case len(parts) == 4 && parts[3] == "svc":
		if _, err := d.a.svcLister.Services(parts[2]).Get(parts[1]); err != nil {
			return nil, false
		}
		for _, e := range serviceEndpoints(d.a.slicesOf(parts[2], parts[1]), nil) {
			if e.Hostname == parts[0] {
				return []string{e.IP}, true
			}
		}
		return nil, false
	case len(parts) == 3 && parts[2] == "pod":
		ip := strings.ReplaceAll(parts[0], "-", ".")
		if _, err := netip.ParseAddr(ip); err == nil {
			return []string{ip}, true
		}
	case len(parts) <= 2:
		// "svc", "<ns>.svc", "pod": existing zones without addresses.
		return nil, true
	}
	return nil, false
}

func (d *dnsServer) forward(query []byte, hdr dnsmessage.Header, q dnsmessage.Question) []byte {
	if d.upstream != "" {
		if c, err := net.DialTimeout("udp", d.upstream, 2*time.Second); err == nil {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := c.Write(query); err == nil {
				buf := make([]byte, 4096)
				if n, err := c.Read(buf); err == nil {
					return buf[:n]
				}
			}
		}
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: hdr.ID, Response: true, RecursionDesired: hdr.RecursionDesired, RCode: dnsmessage.RCodeServerFailure})
	if err := b.StartQuestions(); err != nil {
		return nil
	}
	if err := b.Question(q); err != nil {
		return nil
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}
