package nodeagent

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

type fakeVolumes struct {
	fakeObjects
}

func (fakeVolumes) ServiceAccountToken(_ context.Context, pod *corev1.Pod, aud string, exp int64) (string, error) {
	return "token-for-" + pod.Name + "-" + aud, nil
}

func (fakeVolumes) ClaimPath(context.Context, string, string) (string, error) { return "", errMissing }

func TestVolumeFiles(t *testing.T) {
	src := fakeVolumes{fakeObjects{
		cms: map[string]*corev1.ConfigMap{
			"ns/conf":             {Data: map[string]string{"enabled_plugins": "[x].", "10-warren.conf": "a = 1"}},
			"ns/kube-root-ca.crt": {Data: map[string]string{"ca.crt": "PEM"}},
		},
		secrets: map[string]*corev1.Secret{"ns/cookie": {Data: map[string][]byte{"cookie": []byte("C00KIE")}}},
	}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"}}
	type file struct {
		path, data string
		mode       os.FileMode
	}
	cases := []struct {
		name string
		vol  corev1.Volume
		want []file
	}{
		{"configMap, all keys", corev1.Volume{VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}}}},
			[]file{{"10-warren.conf", "a = 1", 0o644}, {"enabled_plugins", "[x].", 0o644}}},
		{"secret with defaultMode", corev1.Volume{VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "cookie", DefaultMode: ptr.To(int32(0o440))}}},
			[]file{{"cookie", "C00KIE", 0o440}}},
		{"items with paths and modes", corev1.Volume{VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"},
			Items: []corev1.KeyToPath{{Key: "enabled_plugins", Path: "sub/plugins", Mode: ptr.To(int32(0o600))}}}}},
			[]file{{"sub/plugins", "[x].", 0o600}}},
		{"projected service account", corev1.Volume{VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: ptr.To(int64(3607))}},
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"}, Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}}}},
		}}}},
			[]file{{"ca.crt", "PEM", 0o644}, {"namespace", "ns", 0o644}, {"token", "token-for-p-", 0o644}}},
	}
	for _, c := range cases {
		files, isFiles, err := volumeFiles(context.Background(), pod, &c.vol, src, podAddresses{})
		if err != nil || !isFiles {
			t.Fatalf("%s: %v (files %v)", c.name, err, isFiles)
		}
		var got []file
		for _, f := range files {
			got = append(got, file{f.Path, string(f.Data), f.Mode})
		}
		sort.Slice(got, func(i, j int) bool { return got[i].path < got[j].path })
		if len(got) != len(c.want) {
			t.Fatalf("%s: files %v, want %v", c.name, got, c.want)
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: file %v, want %v", c.name, got[i], c.want[i])
			}
		}
	}
	missing := corev1.Volume{VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "absent"}}}
	if _, _, err := volumeFiles(context.Background(), pod, &missing, src, podAddresses{}); err == nil {
		t.Error("a missing secret must fail the volume")
	}
	missing.Secret.Optional = ptr.To(true)
	if files, _, err := volumeFiles(context.Background(), pod, &missing, src, podAddresses{}); err != nil || len(files) != 0 {
		t.Errorf("an optional missing secret is an empty volume: %v %v", files, err)
	}
	empty := corev1.Volume{VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}
	if _, isFiles, _ := volumeFiles(context.Background(), pod, &empty, src, podAddresses{}); isFiles {
		t.Error("emptyDir is a directory volume")
	}
}

func TestWriteVolumeModesAndFSGroup(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	gid := int64(os.Getgid())
	if err := writeVolume(dir, []fileToWrite{{Path: "cookie", Data: []byte("x"), Mode: 0o400}, {Path: "a/b", Data: []byte("y"), Mode: 0o644}}, &gid); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, "cookie"))
	if err != nil {
		t.Fatal(err)
	}
	// fsGroup makes owner-readable files group-readable, as the kubelet does.
	if st.Mode().Perm() != 0o440 {
		t.Errorf("cookie mode %v, want 0440", st.Mode().Perm())
	}
	if st.Sys().(*syscall.Stat_t).Gid != uint32(gid) {
		t.Errorf("cookie group %d, want %d", st.Sys().(*syscall.Stat_t).Gid, gid)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a", "b")); string(b) != "y" {
		t.Errorf("nested file: %q", b)
	}
	if err := writeVolume(dir, []fileToWrite{{Path: "../escape", Data: []byte("x"), Mode: 0o644}}, nil); err == nil {
		t.Error("a path leaving the volume must be refused")
	}
}
