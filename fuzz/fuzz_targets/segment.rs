//! Recovery's reading of a segment on arbitrary bytes, plain and encrypted: it reports
//! what it keeps or an error, and never panics.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use bus::store::log_header::log_header;
use bus::store::scan::scan_bytes;
use bus::store::Cipher;
use libfuzzer_sys::fuzz_target;

fn cipher() -> &'static Cipher {
    static CIPHER: OnceLock<Cipher> = OnceLock::new();
    CIPHER.get_or_init(|| Cipher::new("fuzz", 256).expect("a valid block size"))
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.log");
    let never_native = |_: &str, _: u64| false;
    // The bytes as a whole file, header included.
    for torn_tail_allowed in [true, false] {
        let _ = scan_bytes(data, path, 0, torn_tail_allowed, &never_native, None);
    }
    // After a valid header, so that the records themselves are explored.
    for (encrypted, cipher) in [(false, None), (true, Some(cipher()))] {
        let mut bytes = log_header(0, encrypted).to_vec();
        bytes.extend_from_slice(data);
        if let Ok(scan) = scan_bytes(&bytes, path, 0, true, &never_native, cipher) {
            assert!(scan.kept_file_len <= scan.file_len);
            assert!(scan.ends.windows(2).all(|w| w[0] < w[1]));
        }
    }
});
