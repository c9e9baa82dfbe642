package nodeagent

import (
	"net/netip"
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
