// Package pki generates the certificates, keys and kubeconfigs a local
// control plane needs: one cluster CA, a front-proxy CA for the aggregation
// layer, serving and client certificates, and the service-account signing key.
// Everything is created once per state directory and reused on restart.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

const validity = 10 * 365 * 24 * time.Hour

// Layout names every file the control plane and the node agent read.
type Layout struct {
	Dir string // the pki directory, <state>/pki

	CACert, CAKey                       string
	FrontProxyCACert, FrontProxyCAKey   string
	APIServerCert, APIServerKey         string
	FrontProxyClientCert, FrontProxyKey string
	KubeletClientCert, KubeletClientKey string // the apiserver's client cert towards kubelets
	KubeletServingCert, KubeletServKey  string // the node agent's kubelet API serving cert
	SAKey, SAPub                        string
}

// NewLayout returns the file names under dir.
func NewLayout(dir string) Layout {
	p := func(n string) string { return filepath.Join(dir, n) }
	return Layout{
		Dir:    dir,
		CACert: p("ca.crt"), CAKey: p("ca.key"),
		FrontProxyCACert: p("front-proxy-ca.crt"), FrontProxyCAKey: p("front-proxy-ca.key"),
		APIServerCert: p("apiserver.crt"), APIServerKey: p("apiserver.key"),
		FrontProxyClientCert: p("front-proxy-client.crt"), FrontProxyKey: p("front-proxy-client.key"),
		KubeletClientCert: p("apiserver-kubelet-client.crt"), KubeletClientKey: p("apiserver-kubelet-client.key"),
		KubeletServingCert: p("kubelet.crt"), KubeletServKey: p("kubelet.key"),
		SAKey: p("sa.key"), SAPub: p("sa.pub"),
	}
}

// Authority is a CA able to sign leaf certificates.
type Authority struct {
	Cert    *x509.Certificate
	Key     crypto.Signer
	CertPEM []byte
}

// Leaf describes one certificate to issue.
type Leaf struct {
	CommonName   string
	Organization []string
	DNSNames     []string
	IPs          []net.IP
	Server       bool
	Client       bool
}

// LoadOrCreateCA reads a CA from certFile/keyFile or creates one.
func LoadOrCreateCA(certFile, keyFile, name string) (*Authority, error) {
	if exists(certFile) && exists(keyFile) {
		return loadCA(certFile, keyFile)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating %s key: %w", name, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-signing %s: %w", name, err)
	}
	if err := writeCertAndKey(certFile, keyFile, der, key); err != nil {
		return nil, err
	}
	return loadCA(certFile, keyFile)
}

// EnsureLeaf issues a certificate signed by ca unless certFile/keyFile exist.
func (ca *Authority) EnsureLeaf(certFile, keyFile string, l Leaf) error {
	if exists(certFile) && exists(keyFile) {
		return nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating key for %s: %w", l.CommonName, err)
	}
	var usages []x509.ExtKeyUsage
	if l.Server {
		usages = append(usages, x509.ExtKeyUsageServerAuth)
	}
	if l.Client {
		usages = append(usages, x509.ExtKeyUsageClientAuth)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: l.CommonName, Organization: l.Organization},
		DNSNames:     l.DNSNames,
		IPAddresses:  l.IPs,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usages,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return fmt.Errorf("signing %s: %w", l.CommonName, err)
	}
	return writeCertAndKey(certFile, keyFile, der, key)
}

// ClientPEM issues a client certificate and returns it and its key as PEM, for embedding in a kubeconfig.
func (ca *Authority) ClientPEM(cn string, orgs ...string) (certPEM, keyPEM []byte, err error) {
	dir, err := os.MkdirTemp("", "pki")
	if err != nil {
		return nil, nil, fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	c, k := filepath.Join(dir, "c"), filepath.Join(dir, "k")
	if err := ca.EnsureLeaf(c, k, Leaf{CommonName: cn, Organization: orgs, Client: true}); err != nil {
		return nil, nil, err
	}
	if certPEM, err = os.ReadFile(c); err != nil {
		return nil, nil, fmt.Errorf("reading issued cert: %w", err)
	}
	if keyPEM, err = os.ReadFile(k); err != nil {
		return nil, nil, fmt.Errorf("reading issued key: %w", err)
	}
	return certPEM, keyPEM, nil
}

// EnsureServiceAccountKey creates the RSA key pair that signs service-account tokens.
func EnsureServiceAccountKey(keyFile, pubFile string) error {
	if exists(keyFile) && exists(pubFile) {
		return nil
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generating service-account key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding service-account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return fmt.Errorf("encoding service-account public key: %w", err)
	}
	if err := writePEM(keyFile, "PRIVATE KEY", der, 0o600); err != nil {
		return err
	}
	return writePEM(pubFile, "PUBLIC KEY", pub, 0o644)
}

// Kubeconfig renders a kubeconfig with embedded client credentials.
func Kubeconfig(server, user string, caPEM, certPEM, keyPEM []byte) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: local
  context:
    cluster: local
    user: %s
    namespace: default
current-context: local
`, server, b64(caPEM), user, b64(certPEM), b64(keyPEM), user)
}

func loadCA(certFile, keyFile string) (*Authority, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", certFile, err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", certFile, err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", keyFile, err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, fmt.Errorf("%s: no PEM block", keyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", keyFile, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New(keyFile + ": key cannot sign")
	}
	return &Authority{Cert: cert, Key: signer, CertPEM: certPEM}, nil
}

func writeCertAndKey(certFile, keyFile string, der []byte, key crypto.Signer) error {
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding key for %s: %w", certFile, err)
	}
	if err := writePEM(keyFile, "PRIVATE KEY", kd, 0o600); err != nil {
		return err
	}
	return writePEM(certFile, "CERTIFICATE", der, 0o644)
}

func writePEM(file, typ string, der []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", filepath.Dir(file), err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(file, data, mode); err != nil {
		return fmt.Errorf("writing %s: %w", file, err)
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}
