//! V4L2/UVC cameras through nokhwa (feature `camera`): the requested resolution, pixel format
//! and frame rate are negotiated to the closest the device offers (and logged); a device that
//! is missing, busy or stops delivering is an error the station turns into `camera_failed`
//! and fail-safe parts, and it is reopened (at most once a second) until it works again.

use std::path::Path;
use std::time::{Duration, Instant};

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    Resolution,
};
use nokhwa::Camera;

use super::config::{device_index, CameraConfig, PixelFormat};

pub struct CameraSource {
    device: String,
    index: u32,
    wanted: CameraFormat,
    camera: Option<Camera>,
    retry_at: Instant,
    last_error: String,
    frames: u64,
}

impl CameraSource {
    pub fn new(cfg: &CameraConfig) -> Result<CameraSource, String> {
        let device = cfg.device.clone().unwrap_or_else(|| "/dev/video0".into());
        let index = device_index(&device)?;
        let format = match cfg.pixel_format {
            PixelFormat::Mjpeg => FrameFormat::MJPEG,
            PixelFormat::Yuyv => FrameFormat::YUYV,
        };
        let wanted = CameraFormat::new(
            Resolution::new(cfg.width, cfg.height),
            format,
            cfg.fps.ceil().max(1.0) as u32,
        );
        Ok(CameraSource {
            device: if device.starts_with('/') {
                device
            } else {
                format!("/dev/video{index}")
            },
            index,
            wanted,
            camera: None,
            retry_at: Instant::now(),
            last_error: String::new(),
            frames: 0,
        })
    }

    fn open(&self) -> Result<Camera, String> {
        if !Path::new(&self.device).exists() {
            return Err(format!(
                "{} does not exist: is the camera plugged in? (`ls /dev/video*` or `v4l2-ctl --list-devices` lists them)",
                self.device
            ));
        }
        let requested =
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(self.wanted));
        let busy = |e: &dyn std::fmt::Display| {
            let text = e.to_string();
            if text.contains("busy") || text.contains("EBUSY") {
                format!(
                    "{} is busy: another program holds it (`fuser {}` names it): {text}",
                    self.device, self.device
                )
            } else {
                format!("cannot open {}: {text}", self.device)
            }
        };
        let mut camera = Camera::with_backend(
            CameraIndex::Index(self.index),
            requested,
            ApiBackend::Video4Linux,
        )
        .map_err(|e| busy(&e))?;
        camera.open_stream().map_err(|e| busy(&e))?;
        tracing::info!(
            "camera {}: asked for {}, streaming {}",
            self.device,
            self.wanted,
            camera.camera_format()
        );
        Ok(camera)
    }

    /// The next frame; an error while the device is missing, busy or failing (retried at
    /// most once a second, the same error in between).
    pub fn next_frame(&mut self) -> Result<Option<(String, image::DynamicImage)>, String> {
        if self.camera.is_none() {
            if Instant::now() < self.retry_at {
                return Err(self.last_error.clone());
            }
            match self.open() {
                Ok(c) => self.camera = Some(c),
                Err(e) => {
                    self.retry_at = Instant::now() + Duration::from_secs(1);
                    self.last_error = e.clone();
                    return Err(e);
                }
            }
        }
        let Some(camera) = self.camera.as_mut() else {
            return Err(self.last_error.clone());
        };
        let frame = camera
            .frame()
            .and_then(|buffer| buffer.decode_image::<RgbFormat>());
        match frame {
            Ok(rgb) => {
                self.frames += 1;
                Ok(Some((
                    format!("{}#{}", self.device, self.frames),
                    image::DynamicImage::ImageRgb8(rgb),
                )))
            }
            Err(e) => {
                // Unplugged or wedged: close it and reopen on a later frame.
                self.camera = None;
                self.retry_at = Instant::now() + Duration::from_secs(1);
                self.last_error = format!("{} stopped delivering frames: {e}", self.device);
                Err(self.last_error.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn camera(device: &str) -> CameraConfig {
        let text = format!("name = \"c\"\nkind = \"camera\"\ndevice = \"{device}\"\n");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_missing_camera_says_what_to_check_and_is_retried_later() {
        let mut source = CameraSource::new(&camera("/dev/video97")).unwrap();
        let e = source.next_frame().unwrap_err();
        assert!(e.contains("/dev/video97 does not exist"), "{e}");
        assert!(e.contains("v4l2-ctl --list-devices"), "{e}");
        // Within the second: the same error, without touching the device again.
        assert_eq!(source.next_frame().unwrap_err(), e);
    }
}
