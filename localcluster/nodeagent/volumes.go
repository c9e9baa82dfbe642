package nodeagent

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// volumeSource gives the volume code what it needs besides ConfigMaps and Secrets.
type volumeSource interface {
	objectSource
	// ServiceAccountToken returns a token bound to the pod (TokenRequest).
	ServiceAccountToken(ctx context.Context, pod *corev1.Pod, audience string, expirationSeconds int64) (string, error)
	// ClaimPath returns the local directory of a bound PVC, or an error while it is not bound.
	ClaimPath(ctx context.Context, namespace, claim string) (string, error)
}

// fileToWrite is one file of a ConfigMap/Secret/projected/downward volume.
type fileToWrite struct {
	Path string
	Data []byte
	Mode os.FileMode
}

// keyFiles selects the files of a ConfigMap/Secret volume: all keys, or the items listed.
func keyFiles(data map[string][]byte, items []corev1.KeyToPath, defaultMode *int32, optional bool, what string) ([]fileToWrite, error) {
	mode := os.FileMode(0o644)
	if defaultMode != nil {
		mode = os.FileMode(*defaultMode)
	}
	var out []fileToWrite
	if len(items) == 0 {
		for k, v := range data {
			out = append(out, fileToWrite{Path: k, Data: v, Mode: mode})
		}
		return out, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return nil, fmt.Errorf("%s has no key %q", what, it.Key)
		}
		m := mode
		if it.Mode != nil {
			m = os.FileMode(*it.Mode)
		}
		out = append(out, fileToWrite{Path: it.Path, Data: v, Mode: m})
	}
	return out, nil
}

func configMapData(cm *corev1.ConfigMap) map[string][]byte {
	out := map[string][]byte{}
	for k, v := range cm.Data {
		out[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		out[k] = v
	}
	return out
}

// volumeFiles computes the files of a volume backed by API objects. It returns nil files and
// false for volumes that are directories (emptyDir, PVC, hostPath).
func volumeFiles(ctx context.Context, pod *corev1.Pod, v *corev1.Volume, src volumeSource, addr podAddresses) ([]fileToWrite, bool, error) {
	switch {
	case v.ConfigMap != nil:
		optional := v.ConfigMap.Optional != nil && *v.ConfigMap.Optional
		cm, err := src.ConfigMap(pod.Namespace, v.ConfigMap.Name)
		if err != nil {
			if optional {
				return nil, true, nil
			}
			return nil, true, fmt.Errorf("configMap %q: %w", v.ConfigMap.Name, err)
		}
		files, err := keyFiles(configMapData(cm), v.ConfigMap.Items, v.ConfigMap.DefaultMode, optional, "configMap "+cm.Name)
		return files, true, err
	case v.Secret != nil:
		optional := v.Secret.Optional != nil && *v.Secret.Optional
		s, err := src.Secret(pod.Namespace, v.Secret.SecretName)
		if err != nil {
			if optional {
				return nil, true, nil
			}
			return nil, true, fmt.Errorf("secret %q: %w", v.Secret.SecretName, err)
		}
		files, err := keyFiles(s.Data, v.Secret.Items, v.Secret.DefaultMode, optional, "secret "+s.Name)
		return files, true, err
	case v.DownwardAPI != nil:
		files, err := downwardFiles(pod, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode, addr)
		return files, true, err
	case v.Projected != nil:
		var out []fileToWrite
		for _, s := range v.Projected.Sources {
			var files []fileToWrite
			var err error
			switch {
			case s.ConfigMap != nil:
				optional := s.ConfigMap.Optional != nil && *s.ConfigMap.Optional
				cm, gerr := src.ConfigMap(pod.Namespace, s.ConfigMap.Name)
				if gerr != nil {
					if optional {
						continue
					}
					return nil, true, fmt.Errorf("configMap %q: %w", s.ConfigMap.Name, gerr)
				}
				files, err = keyFiles(configMapData(cm), s.ConfigMap.Items, v.Projected.DefaultMode, optional, "configMap "+cm.Name)
			case s.Secret != nil:
				optional := s.Secret.Optional != nil && *s.Secret.Optional
				sec, gerr := src.Secret(pod.Namespace, s.Secret.Name)
				if gerr != nil {
					if optional {
						continue
					}
					return nil, true, fmt.Errorf("secret %q: %w", s.Secret.Name, gerr)
				}
				files, err = keyFiles(sec.Data, s.Secret.Items, v.Projected.DefaultMode, optional, "secret "+sec.Name)
			case s.DownwardAPI != nil:
				files, err = downwardFiles(pod, s.DownwardAPI.Items, v.Projected.DefaultMode, addr)
			case s.ServiceAccountToken != nil:
				exp := int64(3600)
				if s.ServiceAccountToken.ExpirationSeconds != nil {
					exp = *s.ServiceAccountToken.ExpirationSeconds
				}
				tok, terr := src.ServiceAccountToken(ctx, pod, s.ServiceAccountToken.Audience, exp)
				if terr != nil {
					return nil, true, fmt.Errorf("service account token: %w", terr)
				}
				mode := os.FileMode(0o644)
				if v.Projected.DefaultMode != nil {
					mode = os.FileMode(*v.Projected.DefaultMode)
				}
				files = []fileToWrite{{Path: s.ServiceAccountToken.Path, Data: []byte(tok), Mode: mode}}
			}
			if err != nil {
				return nil, true, err
			}
			out = append(out, files...)
		}
		return out, true, nil
	}
	return nil, false, nil
}

func downwardFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, defaultMode *int32, addr podAddresses) ([]fileToWrite, error) {
	mode := os.FileMode(0o644)
	if defaultMode != nil {
		mode = os.FileMode(*defaultMode)
	}
	var out []fileToWrite
	for _, it := range items {
		if it.FieldRef == nil {
			return nil, fmt.Errorf("downwardAPI %s: only fieldRef is supported", it.Path)
		}
		v, err := podField(pod, it.FieldRef.FieldPath, addr)
		if err != nil {
			return nil, err
		}
		m := mode
		if it.Mode != nil {
			m = os.FileMode(*it.Mode)
		}
		out = append(out, fileToWrite{Path: it.Path, Data: []byte(v), Mode: m})
	}
	return out, nil
}

// safeJoin joins a relative volume path under dir, refusing escapes.
func safeJoin(dir, rel string) (string, error) {
	p := filepath.Join(dir, rel)
	if p != dir && !strings.HasPrefix(p, dir+string(filepath.Separator)) {
		return "", fmt.Errorf("path %q escapes the volume", rel)
	}
	return p, nil
}

// writeVolume materialises files into dir (replacing what was there), group-owned by fsGroup
// when set, like the kubelet's fsGroup ownership management.
func writeVolume(dir string, files []fileToWrite, fsGroup *int64) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range files {
		p, err := safeJoin(dir, f.Path)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, f.Data, f.Mode); err != nil {
			return err
		}
		if err := os.Chmod(p, f.Mode); err != nil {
			return err
		}
	}
	if fsGroup != nil {
		return applyFSGroup(dir, *fsGroup, false)
	}
	return nil
}

// applyFSGroup gives the group ownership of a volume to gid; writable volumes (emptyDir, PVC)
// also get group rw and setgid directories, as the kubelet does.
func applyFSGroup(dir string, gid int64, writable bool) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := os.Lchown(p, -1, int(gid)); err != nil {
			return err
		}
		if d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		if writable {
			mode |= 0o060
			if d.IsDir() {
				mode |= 0o010 | os.ModeSetgid
			}
		} else if mode.Perm()&0o400 != 0 {
			mode |= 0o040
		}
		return os.Chmod(p, mode)
	})
}

// subPathSource resolves a volumeMount's subPath (creating it as a directory when missing, as
// the kubelet does).
func subPathSource(volDir, subPath string) (string, error) {
	if subPath == "" {
		return volDir, nil
	}
	p, err := safeJoin(volDir, subPath)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(p); os.IsNotExist(err) {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return "", err
		}
	}
	return p, nil
}
