package pki

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func readCert(t *testing.T, file string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s: no PEM", file)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLeafChainsToCAAndIsReused(t *testing.T) {
	dir := t.TempDir()
	l := NewLayout(dir)
	ca, err := LoadOrCreateCA(l.CACert, l.CAKey, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	leaf := Leaf{CommonName: "kube-apiserver", Server: true, DNSNames: []string{"kubernetes.default.svc"},
		IPs: []net.IP{net.ParseIP("10.96.0.1")}}
	if err := ca.EnsureLeaf(l.APIServerCert, l.APIServerKey, leaf); err != nil {
		t.Fatal(err)
	}
	cert := readCert(t, l.APIServerCert)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "kubernetes.default.svc"}); err != nil {
		t.Fatalf("serving cert does not verify against the CA: %v", err)
	}
	if err := cert.VerifyHostname("10.96.0.1"); err != nil {
		t.Fatalf("service IP missing from SANs: %v", err)
	}
	if err := cert.VerifyHostname("evil.example"); err == nil {
		t.Fatal("unexpected SAN accepted")
	}

	// A second start reuses the CA and the leaf instead of rotating them.
	again, err := LoadOrCreateCA(l.CACert, l.CAKey, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cert.Equal(ca.Cert) {
		t.Fatal("CA regenerated on reload")
	}
	if err := again.EnsureLeaf(l.APIServerCert, l.APIServerKey, leaf); err != nil {
		t.Fatal(err)
	}
	if !readCert(t, l.APIServerCert).Equal(cert) {
		t.Fatal("leaf regenerated although it existed")
	}
}

func TestClientCertCarriesGroups(t *testing.T) {
	dir := t.TempDir()
	ca, err := LoadOrCreateCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"), "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _, err := ca.ClientPEM("system:node:n1", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject.CommonName != "system:node:n1" || len(c.Subject.Organization) != 1 || c.Subject.Organization[0] != "system:nodes" {
		t.Fatalf("subject %v", c.Subject)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("client cert does not verify for client auth: %v", err)
	}
}
