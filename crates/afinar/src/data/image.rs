//! Images for a CNN: read from IDX files (the MNIST / Fashion-MNIST format,
//! <http://yann.lecun.com/exdb/mnist/>) or from a folder of class folders
//! of PNG / JPEG files (torchvision's `ImageFolder`), kept as bytes; and
//! the transforms that turn a batch of them into the model's input
//! `[B, size, size, 3]` (channels last, f32):
//!
//! 1. grey to three equal channels (RGBA / grey+alpha drop the alpha);
//! 2. resize to `size x size`, bilinear with half-pixel centres (torch's
//!    `F.interpolate(mode="bilinear", align_corners=False)`, no
//!    antialiasing: exact for the upsampling of 28x28 images);
//! 3. training only, when `augment`: a random crop of the image padded by
//!    `crop_padding` black pixels (torchvision's `RandomCrop(size, padding)`)
//!    and a horizontal flip with probability 1/2, drawn from a seed per image;
//! 4. scale to [0, 1] and normalise per channel (ImageNet's mean and std by
//!    default, what torchvision's weights were trained with).

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// One decoded image: `h x w` pixels of `c` (1 or 3) bytes each.
#[derive(Debug, Clone, PartialEq)]
pub struct RawImage {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

/// A labelled image set.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub images: Vec<RawImage>,
    pub labels: Vec<u32>,
    /// Class names, by label id (folder names; IDX: the config's or "0".."N-1").
    pub classes: Vec<String>,
    /// Where the images are (errors name it).
    pub path: PathBuf,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.images.len()
    }
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The images of rows `idx` (a split), same classes.
    pub fn select(&self, idx: &[usize]) -> ImageSet {
        ImageSet {
            images: idx.iter().map(|&i| self.images[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            path: self.path.clone(),
        }
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The header of an IDX file: its dimensions, checked against the file's
/// length (`ndim` dimensions of unsigned bytes expected).
fn idx_dims(path: &Path, b: &[u8], ndim: usize) -> Result<Vec<usize>> {
    if b.len() < 4 {
        return Err(Error::file(
            path,
            "not an IDX file: shorter than its 4-byte magic",
        ));
    }
    if b[0] != 0 || b[1] != 0 {
        return Err(Error::file(
            path,
            format!(
                "not an IDX file: magic {:02x?} does not start with two zero bytes",
                &b[..4]
            ),
        ));
    }
    if b[2] != 0x08 {
        return Err(Error::file(
            path,
            format!(
                "IDX element type 0x{:02x}: only unsigned bytes (0x08) are read",
                b[2]
            ),
        ));
    }
    if b[3] as usize != ndim {
        return Err(Error::file(
            path,
            format!("IDX file of {} dimensions, expected {ndim}", b[3]),
        ));
    }
    let head = 4 + 4 * ndim;
    if b.len() < head {
        return Err(Error::file(path, "IDX header is truncated"));
    }
    let dims: Vec<usize> = (0..ndim).map(|i| be_u32(b, 4 + 4 * i) as usize).collect();
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want.and_then(|n| n.checked_add(head)) != Some(b.len()) {
        return Err(Error::file(
            path,
            format!(
                "IDX dimensions {dims:?} need {} bytes of data, the file holds {}",
                want.map_or("too many".to_string(), |n| n.to_string()),
                b.len() - head
            ),
        ));
    }
    Ok(dims)
}

/// Images (`[N, rows, cols]` bytes) and labels (`[N]`) from two IDX files.
pub fn read_idx(images: &Path, labels: &Path, classes: Option<&[String]>) -> Result<ImageSet> {
    let ib = std::fs::read(images).map_err(|e| Error::io(images, e))?;
    let lb = std::fs::read(labels).map_err(|e| Error::io(labels, e))?;
    idx_from_bytes(&ib, &lb, images, labels, classes)
}

/// [`read_idx`] of the files' bytes (`images`, `labels` name them in errors).
pub fn idx_from_bytes(
    ib: &[u8],
    lb: &[u8],
    images: &Path,
    labels: &Path,
    classes: Option<&[String]>,
) -> Result<ImageSet> {
    let d = idx_dims(images, ib, 3)?;
    let ld = idx_dims(labels, lb, 1)?;
    let (n, h, w) = (d[0], d[1], d[2]);
    if ld[0] != n {
        return Err(Error::file(
            labels,
            format!(
                "{} labels for the {n} images of {}",
                ld[0],
                images.display()
            ),
        ));
    }
    if h == 0 || w == 0 {
        return Err(Error::file(images, format!("images of {h}x{w} pixels")));
    }
    let lab: Vec<u32> = lb[8..].iter().map(|&v| v as u32).collect();
    let top = lab.iter().copied().max().unwrap_or(0) as usize;
    let classes: Vec<String> = match classes {
        Some(c) => {
            if let Some(i) = lab.iter().position(|&l| l as usize >= c.len()) {
                return Err(Error::file(
                    labels,
                    format!(
                        "label {} of image {i} has no name: `data.label_names` lists {} classes",
                        lab[i],
                        c.len()
                    ),
                ));
            }
            c.to_vec()
        }
        None => (0..=top).map(|i| i.to_string()).collect(),
    };
    let px = h * w;
    let images_v = (0..n)
        .map(|i| RawImage {
            h,
            w,
            c: 1,
            data: ib[16 + i * px..16 + (i + 1) * px].to_vec(),
        })
        .collect();
    Ok(ImageSet {
        images: images_v,
        labels: lab,
        classes,
        path: images.to_path_buf(),
    })
}

/// A folder of class folders (`root/<class>/<image>.png|jpg|jpeg`), classes
/// in name order (torchvision's `ImageFolder`); with `classes` given, the
/// folders must be exactly those (a validation set uses the training set's).
pub fn read_folder(root: &Path, classes: Option<&[String]>) -> Result<ImageSet> {
    let list = |p: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| Error::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let dirs: Vec<PathBuf> = list(root)?.into_iter().filter(|p| p.is_dir()).collect();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| {
            d.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    if names.is_empty() {
        return Err(Error::file(
            root,
            "no class folders (root/<class>/<image>.png)",
        ));
    }
    let classes: Vec<String> = match classes {
        Some(c) => {
            if let Some(extra) = names.iter().find(|n| !c.contains(n)) {
                return Err(Error::file(
                    &root.join(extra),
                    format!("class folder `{extra}` is not one of the training classes {c:?}"),
                ));
            }
            c.to_vec()
        }
        None => names.clone(),
    };
    let mut set = ImageSet {
        images: vec![],
        labels: vec![],
        classes,
        path: root.to_path_buf(),
    };
    for (d, name) in dirs.iter().zip(&names) {
        let label = set.classes.iter().position(|c| c == name).unwrap_or(0) as u32;
        for f in list(d)? {
            let ext = f
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !matches!(ext.as_str(), "png" | "jpg" | "jpeg") {
                continue;
            }
            set.images.push(decode_file(&f)?);
            set.labels.push(label);
        }
    }
    if set.images.is_empty() {
        return Err(Error::file(
            root,
            "no .png / .jpg / .jpeg images in the class folders",
        ));
    }
    Ok(set)
}

/// Decode one PNG or JPEG file (by its content, not its name).
pub fn decode_file(path: &Path) -> Result<RawImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes).map_err(|e| Error::file(path, e))
}

/// Decode PNG or JPEG bytes to 8-bit grey or RGB.
pub fn decode(bytes: &[u8]) -> std::result::Result<RawImage, String> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        decode_jpeg(bytes)
    } else {
        Err("not a PNG or JPEG image".into())
    }
}

fn decode_png(bytes: &[u8]) -> std::result::Result<RawImage, String> {
    let mut dec = png::Decoder::new(bytes);
    // 16-bit to 8, palettes and low bit depths expanded.
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w.saturating_mul(h) > 1 << 26 {
        return Err(format!(
            "PNG of {w}x{h} pixels is larger than afinar reads (2^26)"
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("PNG: {e}"))?;
    let src = &buf[..info.buffer_size()];
    let (c, keep): (usize, usize) = match info.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        png::ColorType::Indexed => return Err("PNG palette was not expanded".into()),
    };
    let data = if c == keep {
        src.to_vec()
    } else {
        src.chunks_exact(c)
            .flat_map(|p| p[..keep].to_vec())
            .collect()
    };
    Ok(RawImage {
        h,
        w,
        c: keep,
        data,
    })
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RawImage, String> {
    let mut dec = jpeg_decoder::Decoder::new(bytes);
    dec.read_info().map_err(|e| format!("JPEG: {e}"))?;
    let info = dec.info().ok_or("JPEG: no header")?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w.saturating_mul(h) > 1 << 26 {
        return Err(format!(
            "JPEG of {w}x{h} pixels is larger than afinar reads (2^26)"
        ));
    }
    let px = dec.decode().map_err(|e| format!("JPEG: {e}"))?;
    let c = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        other => {
            return Err(format!(
                "JPEG pixel format {other:?} is not read (grey or RGB)"
            ))
        }
    };
    Ok(RawImage { h, w, c, data: px })
}

/// How images become model inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Training-time augmentation: padding of the random crop (0: none) and
    /// the horizontal flip.
    pub crop_padding: usize,
    pub flip: bool,
}

/// ImageNet's channel means and standard deviations (torchvision's weights).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Transform {
    /// The inputs `[B, size, size, 3]` (row-major, channels last) of
    /// `images`; `aug`: one seed per image for the random crop and flip
    /// (None: evaluation, no augmentation).
    pub fn batch(&self, images: &[&RawImage], aug: Option<&[u64]>) -> Vec<f32> {
        use rayon::prelude::*;
        let s = self.size;
        let mut out = vec![0f32; images.len() * s * s * 3];
        out.par_chunks_mut(s * s * 3)
            .enumerate()
            .for_each(|(i, o)| self.one(images[i], aug.map(|a| a[i]), o));
        out
    }

    fn one(&self, img: &RawImage, seed: Option<u64>, out: &mut [f32]) {
        let s = self.size;
        let resized = resize_bilinear(img, s, s); // [s, s, c] in [0, 255]
        let (dy, dx, flip) = match seed {
            Some(seed) => {
                let r1 = crate::data::splitmix64(seed);
                let r2 = crate::data::splitmix64(r1);
                let span = 2 * self.crop_padding as u64 + 1;
                let (oy, ox) = (r1 % span, (r1 >> 32) % span);
                (
                    oy as isize - self.crop_padding as isize,
                    ox as isize - self.crop_padding as isize,
                    self.flip && r2 & 1 == 1,
                )
            }
            None => (0, 0, false),
        };
        let c = img.c;
        for y in 0..s {
            for x in 0..s {
                // The output pixel (y, x) reads the padded image at (y + dy, x + dx),
                // after the flip of the crop.
                let xs = if flip { s - 1 - x } else { x };
                let (sy, sx) = (y as isize + dy, xs as isize + dx);
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < s && (sx as usize) < s;
                for ch in 0..3 {
                    let v = if inside {
                        resized[(sy as usize * s + sx as usize) * c + if c == 1 { 0 } else { ch }]
                    } else {
                        0.0
                    };
                    out[(y * s + x) * 3 + ch] = (v / 255.0 - self.mean[ch]) / self.std[ch];
                }
            }
        }
    }
}

/// Bilinear resize with half-pixel centres (`align_corners=False`), no
/// antialiasing; values stay in [0, 255] as f32.
pub fn resize_bilinear(img: &RawImage, oh: usize, ow: usize) -> Vec<f32> {
    let c = img.c;
    // Source coordinate of each output index, clamped at 0 as torch does.
    let coords = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let ys = coords(oh, img.h);
    let xs = coords(ow, img.w);
    let px = |y: usize, x: usize, ch: usize| img.data[(y * img.w + x) * c + ch] as f32;
    let mut out = vec![0f32; oh * ow * c];
    for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            for ch in 0..c {
                let top = px(y0, x0, ch) * (1.0 - fx) + px(y0, x1, ch) * fx;
                let bot = px(y1, x0, ch) * (1.0 - fx) + px(y1, x1, ch) * fx;
                out[(y * ow + x) * c + ch] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn idx_files_read_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (im, lb) = (dir.path().join("im"), dir.path().join("lb"));
        std::fs::write(
            &im,
            idx(&[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        )
        .unwrap();
        std::fs::write(&lb, idx(&[2], &[1, 0])).unwrap();
        let s = read_idx(&im, &lb, None).unwrap();
        assert_eq!(s.labels, vec![1, 0]);
        assert_eq!(s.images[1].data, vec![6, 7, 8, 9, 10, 11]);
        assert_eq!((s.images[0].h, s.images[0].w), (2, 3));
        assert_eq!(s.classes, vec!["0", "1"]);
        std::fs::write(&lb, idx(&[3], &[1, 0, 1])).unwrap();
        let e = read_idx(&im, &lb, None).unwrap_err().to_string();
        assert!(e.contains("3 labels for the 2 images"), "{e}");
        std::fs::write(&im, idx(&[2, 2, 3], &[0; 11])).unwrap();
        let e = read_idx(&im, &lb, None).unwrap_err().to_string();
        assert!(
            e.contains("need 12 bytes of data, the file holds 11"),
            "{e}"
        );
        std::fs::write(&im, b"PK\x03\x04rest").unwrap();
        let e = read_idx(&im, &lb, None).unwrap_err().to_string();
        assert!(e.contains("not an IDX file"), "{e}");
    }

    #[test]
    fn resize_keeps_a_constant_image_and_interpolates_between_pixels() {
        let img = RawImage {
            h: 1,
            w: 2,
            c: 1,
            data: vec![0, 100],
        };
        // 2 -> 4 with half-pixel centres: sources -0.25 (clamped), 0.25, 0.75, 1.25.
        let r = resize_bilinear(&img, 1, 4);
        assert_eq!(r, vec![0.0, 25.0, 75.0, 100.0]);
        let flat = RawImage {
            h: 3,
            w: 3,
            c: 3,
            data: vec![7; 27],
        };
        assert!(resize_bilinear(&flat, 5, 4).iter().all(|&v| v == 7.0));
    }

    #[test]
    fn augmentation_is_seeded_and_evaluation_is_not_augmented() {
        let img = RawImage {
            h: 4,
            w: 4,
            c: 1,
            data: (0..16).map(|v| v * 10).collect(),
        };
        let t = Transform {
            size: 4,
            mean: [0.0; 3],
            std: [1.0; 3],
            crop_padding: 1,
            flip: true,
        };
        let a = t.batch(&[&img, &img], Some(&[1, 2]));
        let b = t.batch(&[&img, &img], Some(&[1, 2]));
        assert_eq!(a, b);
        let plain = t.batch(&[&img], None);
        assert_eq!(plain[..3], [0.0, 0.0, 0.0]);
        assert!((plain[3 * 5] - 50.0 / 255.0).abs() < 1e-6);
        // Some seed among a few moves the image (crop or flip).
        assert!((0..8).any(|s| t.batch(&[&img], Some(&[s])) != plain));
    }

    /// JPEGs written by PIL (scripts/reference: `Image.save(quality=90)`):
    /// shape and pixels as PIL decodes them, within the IDCT's rounding.
    #[test]
    fn jpeg_fixtures_decode_as_pil_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
        for (name, c, pil_mean) in [("grey.jpg", 1, 126.125), ("rgb.jpg", 3, 95.692708)] {
            let im = decode_file(&dir.join(name)).unwrap();
            assert_eq!((im.h, im.w, im.c), (8, 8, c), "{name}");
            let mean = im.data.iter().map(|&v| v as f64).sum::<f64>() / im.data.len() as f64;
            assert!(
                (mean - pil_mean).abs() < 1.0,
                "{name}: mean {mean} vs PIL's {pil_mean}"
            );
        }
    }

    #[test]
    fn png_and_jpeg_decode_and_junk_is_named() {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 2, 1);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[1, 2, 3, 255, 4, 5, 6, 0]).unwrap();
        }
        let im = decode(&bytes).unwrap();
        assert_eq!((im.h, im.w, im.c), (1, 2, 3));
        assert_eq!(im.data, vec![1, 2, 3, 4, 5, 6]);
        assert!(decode(b"GIF89a").unwrap_err().contains("not a PNG or JPEG"));
        assert!(decode(&[0xff, 0xd8, 0, 1]).unwrap_err().starts_with("JPEG"));
    }
}
