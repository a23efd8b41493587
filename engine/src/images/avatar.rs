//! Generated avatars: a deterministic geometric identicon per user id, encoded as a real PNG.
//!
//! The demo and `spendflow generate --avatars` need a picture per user without shipping image
//! files. An identicon (a symmetric 5×5 pattern in one colour on a light background, both
//! derived from a hash of the seed and the user id) is recognisable and costs microseconds.
//!
//! The image is an 8-bit indexed-colour PNG (two palette entries) written by the `png` crate
//! (the encoder of the `image` crates, without their decoders): chunks, CRCs and zlib are its
//! business, not ours.

/// Cells per side of the pattern.
pub const CELLS: u32 = 5;
/// Pixels per cell.
pub const CELL_PX: u32 = 16;
/// Margin around the pattern, in pixels.
pub const MARGIN_PX: u32 = 8;
/// Width and height of an avatar, in pixels.
pub const SIZE_PX: u32 = CELLS * CELL_PX + 2 * MARGIN_PX;

/// The PNG file signature.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// The avatar of `user_id` under `seed`, as PNG bytes. The same arguments always give the same
/// bytes.
pub fn avatar_png(seed: u64, user_id: u64) -> Vec<u8> {
    let mut h = mix(seed ^ 0xA7A7_A7A7_0000_0000 ^ user_id.rotate_left(17));
    let colour = hsl_to_rgb((h % 360) as u32, 55, 50);
    h = mix(h);
    // Left three columns decide, the right two mirror them. Never an empty pattern.
    let mut on = [[false; CELLS as usize]; CELLS as usize];
    let mut bits = h;
    let mut any = false;
    for row in on.iter_mut() {
        for col in 0..3 {
            let set = bits & 1 == 1;
            bits >>= 1;
            row[col] = set;
            row[CELLS as usize - 1 - col] = set;
            any |= set;
        }
    }
    if !any {
        on[2][2] = true;
    }
    let background = [0xF0, 0xF0, 0xF0];
    let width = SIZE_PX;
    let mut pixels = vec![0u8; (width * width) as usize];
    for y in 0..width {
        for x in 0..width {
            let inside = (MARGIN_PX..MARGIN_PX + CELLS * CELL_PX).contains(&x)
                && (MARGIN_PX..MARGIN_PX + CELLS * CELL_PX).contains(&y);
            if inside {
                let (cx, cy) = ((x - MARGIN_PX) / CELL_PX, (y - MARGIN_PX) / CELL_PX);
                if on[cy as usize][cx as usize] {
                    pixels[(y * width + x) as usize] = 1;
                }
            }
        }
    }
    encode_indexed_png(width, width, &[background, colour], &pixels)
}

/// Encodes an 8-bit indexed-colour PNG: `pixels` holds one palette index per pixel, row by row.
/// Rows are stored unfiltered (filter type 0): a two-colour image of flat areas compresses well
/// without filters, and the bytes do not depend on the encoder's filter heuristics.
///
/// # Panics
///
/// If `pixels.len() != width * height`, the palette is empty or has more than 256 entries, or
/// a dimension is 0 (the only ways encoding into memory can fail).
pub fn encode_indexed_png(width: u32, height: u32, palette: &[[u8; 3]], pixels: &[u8]) -> Vec<u8> {
    assert_eq!(pixels.len(), (width as usize) * (height as usize));
    assert!(!palette.is_empty() && palette.len() <= 256);
    let mut out = Vec::with_capacity(256 + pixels.len() / 8);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(palette.iter().flatten().copied().collect::<Vec<u8>>());
    encoder.set_filter(png::Filter::NoFilter);
    let written = encoder.write_header().and_then(|mut writer| {
        writer.write_image_data(pixels)?;
        writer.finish()
    });
    // The parameters are checked above and a Vec takes every write.
    written.expect("an indexed image of valid size encodes into memory");
    out
}

/// A valid PNG of exactly `size` bytes: a 16×16 picture of seeded colours, padded with a text
/// chunk; for tests and measurements of uploads, which decode what they store. Different
/// seeds give different bytes.
///
/// # Panics
///
/// If `size` is below the smallest such PNG (a few hundred bytes).
pub fn padded_png(seed: u64, size: usize) -> Vec<u8> {
    let encode = |text: String| {
        let mut h = mix(seed);
        let palette: Vec<[u8; 3]> = (0..4)
            .map(|_| {
                h = mix(h);
                [h as u8, (h >> 8) as u8, (h >> 16) as u8]
            })
            .collect();
        let pixels: Vec<u8> = (0..256)
            .map(|_| {
                h = mix(h);
                (h % 4) as u8
            })
            .collect();
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, 16, 16);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(palette.iter().flatten().copied().collect::<Vec<u8>>());
        encoder
            .add_text_chunk("pad".into(), text)
            .expect("a text chunk");
        let written = encoder.write_header().and_then(|mut writer| {
            writer.write_image_data(&pixels)?;
            writer.finish()
        });
        written.expect("a small image encodes into memory");
        out
    };
    let smallest = encode(String::new()).len();
    assert!(
        size >= smallest,
        "a padded PNG has at least {smallest} bytes, not {size}"
    );
    let png = encode("x".repeat(size - smallest));
    assert_eq!(png.len(), size);
    png
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// HSL (hue in degrees, saturation and lightness in percent) to RGB, integer arithmetic.
fn hsl_to_rgb(hue: u32, saturation: u32, lightness: u32) -> [u8; 3] {
    // Chroma and friends scaled by 100 * 100 to stay in integers.
    let l = lightness as i64;
    let s = saturation as i64;
    let c = (100 - (2 * l - 100).abs()) * s; // 0..=10_000
    let h = (hue % 360) as i64;
    let x = c * (60 - ((h % 120) - 60).abs()) / 60;
    let m = l * 100 - c / 2;
    let (r, g, b) = match h / 60 {
        0 => (c, x, 0),
        1 => (x, c, 0),
        2 => (0, c, x),
        3 => (0, x, c),
        4 => (x, 0, c),
        _ => (c, 0, x),
    };
    let to_byte = |v: i64| (((v + m) * 255 + 5_000) / 10_000).clamp(0, 255) as u8;
    [to_byte(r), to_byte(g), to_byte(b)]
}
