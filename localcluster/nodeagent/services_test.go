package nodeagent

import (
	"net"
	"net/netip"
	"sort"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

func slice(ns, svc, name string, port int32, portName string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(portName), Port: ptr.To(port)}},
		Endpoints:   eps,
	}
}

func ep(ip string, ready bool, hostname string) discoveryv1.Endpoint {
	e := discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(ready)}}
	if hostname != "" {
		e.Hostname = ptr.To(hostname)
	}
	return e
}

func testAgent(t *testing.T) *agent {
	t.Helper()
	svcIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	sliceIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, s := range []*corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "warren-sender"}, Spec: corev1.ServiceSpec{ClusterIP: "10.96.5.5", Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "warren-rabbitmq-headless"}, Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone}},
	} {
		if err := svcIdx.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*discoveryv1.EndpointSlice{
		slice("default", "warren-sender", "s1", 8080, "http", ep("10.244.0.3", true, ""), ep("10.244.0.4", false, "")),
		slice("default", "warren-rabbitmq-headless", "r1", 5672, "amqp", ep("10.244.0.2", true, "warren-rabbitmq-0"), ep("10.244.0.9", true, "warren-rabbitmq-1")),
	} {
		if err := sliceIdx.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	return &agent{
		cfg:         Config{ClusterDomain: "cluster.local"},
		svcLister:   corelisters.NewServiceLister(svcIdx),
		sliceLister: discoverylisters.NewEndpointSliceLister(sliceIdx),
	}
}

func TestServiceEndpointsSkipsNotReady(t *testing.T) {
	a := testAgent(t)
	got := serviceEndpoints(a.slicesOf("default", "warren-sender"), ptr.To("http"))
	if len(got) != 1 || got[0].IP != "10.244.0.3" || got[0].Port != 8080 {
		t.Errorf("endpoints %+v, want only the ready 10.244.0.3:8080 (service port 80 -> target 8080)", got)
	}
}

func query(t *testing.T, d *dnsServer, name string, typ dnsmessage.Type) (dnsmessage.RCode, []string) {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		t.Fatal(err)
	}
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	resp := d.answer(q)
	var msg dnsmessage.Message
	if err := msg.Unpack(resp); err != nil {
		t.Fatal(err)
	}
	if msg.Header.ID != 7 || !msg.Header.Response {
		t.Errorf("bad response header %+v", msg.Header)
	}
	var ips []string
	for _, ans := range msg.Answers {
		if a, ok := ans.Body.(*dnsmessage.AResource); ok {
			ips = append(ips, netip.AddrFrom4(a.A).String())
		}
	}
	sort.Strings(ips)
	return msg.Header.RCode, ips
}

func TestClusterDNS(t *testing.T) {
	d := &dnsServer{a: testAgent(t)}
	cases := []struct {
		name  string
		rcode dnsmessage.RCode
		ips   []string
	}{
		{"warren-sender.default.svc.cluster.local.", dnsmessage.RCodeSuccess, []string{"10.96.5.5"}},
		{"WARREN-SENDER.default.svc.cluster.local.", dnsmessage.RCodeSuccess, []string{"10.96.5.5"}},
		{"warren-rabbitmq-headless.default.svc.cluster.local.", dnsmessage.RCodeSuccess, []string{"10.244.0.2", "10.244.0.9"}},
		{"warren-rabbitmq-0.warren-rabbitmq-headless.default.svc.cluster.local.", dnsmessage.RCodeSuccess, []string{"10.244.0.2"}},
		{"warren-rabbitmq-5.warren-rabbitmq-headless.default.svc.cluster.local.", dnsmessage.RCodeNameError, nil},
		{"warren-sender.other.svc.cluster.local.", dnsmessage.RCodeNameError, nil},
		// The search-path attempt "<name>.<ns>.svc.cluster.local" of an absolute service name.
		{"warren-sender.default.svc.cluster.local.default.svc.cluster.local.", dnsmessage.RCodeNameError, nil},
		{"10-244-0-3.default.pod.cluster.local.", dnsmessage.RCodeSuccess, []string{"10.244.0.3"}},
	}
	for _, c := range cases {
		rcode, ips := query(t, d, c.name, dnsmessage.TypeA)
		if rcode != c.rcode || len(ips) != len(c.ips) {
			t.Errorf("%s: %v %v, want %v %v", c.name, rcode, ips, c.rcode, c.ips)
			continue
		}
		for i := range ips {
			if ips[i] != c.ips[i] {
				t.Errorf("%s: %v, want %v", c.name, ips, c.ips)
			}
		}
	}
	// AAAA of an existing name: no data, not NXDOMAIN (or resolvers give up on the A record).
	if rcode, ips := query(t, d, "warren-sender.default.svc.cluster.local.", dnsmessage.TypeAAAA); rcode != dnsmessage.RCodeSuccess || len(ips) != 0 {
		t.Errorf("AAAA: %v %v", rcode, ips)
	}
}

func TestSplicePropagatesHalfClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// Backend: echo everything, then close after the client's half-close.
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 1024)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				_, _ = c.Write(buf[:n])
			}
			if err != nil {
				_ = c.Close()
				return
			}
		}
	}()
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	go func() {
		c, err := front.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		splice(c, b)
		_ = c.Close()
		_ = b.Close()
	}()
	client, err := net.Dial("tcp", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := client.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	var got []byte
	buf := make([]byte, 16)
	for {
		n, err := client.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	if string(got) != "ping" {
		t.Errorf("echo through the proxy: %q", got)
	}
}
